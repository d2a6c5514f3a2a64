"""The training loop and checkpoints: loss decreases, atomic checkpoints, exact resume, errors."""

import json

import pytest
import torch

from bayesmanifold.errors import CheckpointError, ConfigError
from bayesmanifold.models import (
    ModelSpec,
    TrainConfig,
    build_model,
    load_checkpoint,
    load_snapshot,
    preset_spec,
    train,
)
from bayesmanifold.models.snapshots import list_snapshots
from bayesmanifold.windtunnels import BijectionTask, HMMTask

TASK = BijectionTask(V=6, L=5)


def small_config(**kw):
    base = dict(steps=12, batch_size=16, lr=3e-3, warmup_steps=2, eval_every=6, n_eval=16,
                checkpoint_every=4, log_every=1, progress=False, seed=1)
    base.update(kw)
    return TrainConfig(**base)


def test_loss_decreases():
    spec = preset_spec("tiny", TASK)
    res = train(TASK, spec, small_config(steps=60, eval_every=60, lr=2e-2))
    losses = [v for _, v in res.history["loss"]]
    assert sum(losses[-10:]) / 10 < sum(losses[:10]) / 10 - 0.05
    assert res.history["eval"][-1]["step"] == 60


class Interrupt:
    def __init__(self, at):
        self.at = at

    def on_step(self, model, step):
        if step == self.at:
            raise KeyboardInterrupt


class Recorder:
    name = "recorder"

    def __init__(self):
        self.steps = []

    def on_step(self, model, step):
        assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
        self.steps.append(step)

    def state(self):
        return {"n_calls": len(self.steps)}


@pytest.mark.parametrize("arch", ["transformer", "lstm", "mlp"])
def test_resume_equals_uninterrupted(tmp_path, arch):
    spec = preset_spec("tiny", TASK, arch=arch)
    cfg = small_config()
    full = train(TASK, spec, cfg, out_dir=tmp_path / "full")
    with pytest.raises(KeyboardInterrupt):
        train(TASK, spec, cfg, out_dir=tmp_path / "cut", callbacks=(Interrupt(7),))
    cut = tmp_path / "cut"
    conf = json.loads((cut / "config.json").read_text())
    assert conf["step"] == 7 and conf["complete"] is False
    assert (cut / "train_state.pt").is_file()
    assert not [p.name for p in cut.iterdir() if p.name.startswith(".")]  # no temp files left
    resumed = train(TASK, spec, cfg, out_dir=cut)
    a, b = full.model.state_dict(), resumed.model.state_dict()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)
    assert full.history["loss"] == resumed.history["loss"]
    assert [e["entropy_mae_bits"] for e in full.history["eval"]] == [
        e["entropy_mae_bits"] for e in resumed.history["eval"]]
    assert not (cut / "train_state.pt").exists()  # finished: the resume state is dropped
    model, task, config, history = load_checkpoint(cut)
    assert task == TASK and config["complete"] and config["arch"] == arch
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, b[k].cpu())
    # a finished run is loaded, not retrained
    again = train(TASK, spec, cfg, out_dir=cut)
    assert again.history["loss"] == resumed.history["loss"]
    with pytest.raises(CheckpointError, match="different train"):
        train(TASK, spec, small_config(steps=20), out_dir=cut)


def test_callbacks_and_snapshots(tmp_path):
    spec = preset_spec("tiny", TASK)
    rec = Recorder()
    res = train(TASK, spec, small_config(snapshot_steps=(0, 3, 12)), out_dir=tmp_path / "r",
                callbacks=(rec,))
    assert rec.steps == list(range(1, 13))
    assert res.history["callbacks"]["recorder"] == {"n_calls": 12}
    snaps = list_snapshots(tmp_path / "r")
    assert [s for s, _ in snaps] == [0, 3, 12]
    m12 = load_snapshot(tmp_path / "r", 12)
    for k, v in res.model.state_dict().items():
        if v.is_floating_point():
            torch.testing.assert_close(m12.state_dict()[k], v.half().float())
    m0 = load_snapshot(tmp_path / "r", 0)
    fresh = build_model(spec, seed=1)
    for k, v in fresh.state_dict().items():
        if v.is_floating_point():
            torch.testing.assert_close(m0.state_dict()[k], v.half().float())
    with pytest.raises(CheckpointError, match="no snapshot"):
        load_snapshot(tmp_path / "r", 5)


def test_bad_checkpoint_dirs(tmp_path):
    with pytest.raises(CheckpointError):
        load_checkpoint(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="config.json"):
        load_checkpoint(tmp_path / "empty")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError):
        load_checkpoint(bad)
    spec = preset_spec("tiny", TASK)
    train(TASK, spec, small_config(steps=2), out_dir=tmp_path / "ok")
    (tmp_path / "ok" / "model.pt").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="weights"):
        load_checkpoint(tmp_path / "ok")
    # an output directory holding something else is refused
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("x")
    with pytest.raises(CheckpointError, match="not empty"):
        train(TASK, spec, small_config(steps=2), out_dir=other)
    # a partial run of another configuration is refused
    with pytest.raises(KeyboardInterrupt):
        train(TASK, spec, small_config(), out_dir=tmp_path / "p", callbacks=(Interrupt(3),))
    with pytest.raises(CheckpointError, match="different"):
        train(TASK, spec, small_config(lr=1e-4), out_dir=tmp_path / "p")


def test_bad_configs():
    with pytest.raises(ConfigError):
        TrainConfig(steps=0)
    with pytest.raises(ConfigError):
        TrainConfig(loss="mse")
    with pytest.raises(ConfigError):
        TrainConfig(steps=10, snapshot_steps=(11,))
    with pytest.raises(ConfigError):
        ModelSpec(arch="gru", n_layers=1, d_model=8, d_vocab=4, n_ctx=4)
    with pytest.raises(ConfigError, match="does not fit"):
        train(HMMTask(K=3), preset_spec("tiny", TASK), small_config())
    with pytest.raises(ConfigError, match="on_step"):
        train(TASK, preset_spec("tiny", TASK), small_config(), callbacks=(object(),))


@pytest.mark.parametrize("arch", ["transformer", "lstm", "mlp"])
def test_models_are_causal_and_seeded(arch):
    spec = preset_spec("tiny", TASK, arch=arch)
    state = torch.get_rng_state()
    m = build_model(spec, seed=3).eval()
    assert torch.equal(state, torch.get_rng_state())
    m2 = build_model(spec, seed=3)
    for k, v in m.state_dict().items():
        assert torch.equal(v, m2.state_dict()[k])
    tokens = TASK.sample(2, 0).tokens
    changed = tokens.clone()
    changed[:, 6] = (changed[:, 6] + 1) % TASK.d_vocab
    with torch.no_grad():
        a, b = m(tokens), m(changed)
    assert a.shape == (2, TASK.seq_len, TASK.d_vocab)
    torch.testing.assert_close(a[:, :6], b[:, :6])
    assert not torch.allclose(a[:, 6:], b[:, 6:])


def test_paper_presets_have_paper_sizes():
    from bayesmanifold.models.presets import hooked_config

    spec = preset_spec("bijection-paper", BijectionTask(V=20, L=19))
    cfg = hooked_config(spec)
    assert tuple(cfg[k] for k in ("n_layers", "n_heads", "d_model", "d_head", "d_mlp")) == (6, 6, 192, 32, 768)
    assert cfg["normalization_type"] == "RMSPre" and cfg["positional_embedding_type"] == "standard"
    hmm = preset_spec("hmm-paper", HMMTask())
    assert (hmm.n_layers, hmm.n_heads, hmm.d_model) == (9, 8, 256)
    assert hmm.n_ctx >= HMMTask(K=50).seq_len  # room for the K=50 length test


class SendSigint:
    def on_step(self, model, step):
        if step == 5:
            import os
            import signal

            os.kill(os.getpid(), signal.SIGINT)


def test_sigint_is_deferred_to_a_consistent_checkpoint(tmp_path):
    spec = preset_spec("tiny", TASK)
    cfg = small_config()
    full = train(TASK, spec, cfg)
    with pytest.raises(KeyboardInterrupt):
        train(TASK, spec, cfg, out_dir=tmp_path / "s", callbacks=(SendSigint(),))
    assert json.loads((tmp_path / "s" / "config.json").read_text())["step"] == 5
    resumed = train(TASK, spec, cfg, out_dir=tmp_path / "s")
    for k, v in full.model.state_dict().items():
        torch.testing.assert_close(resumed.model.state_dict()[k], v, rtol=0, atol=0)
