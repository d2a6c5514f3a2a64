"""Dynamics monitor: JSD, stabilisation rule, a tiny training run, replay = online, train() hook."""

import json
import math

import numpy as np
import pytest
import torch
from helpers import hook_count, make_model, needs_hooked

from bayesmanifold.analyses.dynamics import DynamicsResult
from bayesmanifold.analyses.monitor import DynamicsMonitor, replay
from bayesmanifold.analyses.stats import js_divergence, settling_step, stabilization_step
from bayesmanifold.errors import CheckpointError, ConfigError, InputError


def test_js_divergence_closed_forms():
    p = torch.tensor([0.2, 0.3, 0.5])
    assert float(js_divergence(p, p)) == pytest.approx(0.0, abs=1e-12)
    assert float(js_divergence(torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0]))) == pytest.approx(math.log(2))


def test_stabilization_rule():
    steps = [0, 10, 20, 30, 40, 50, 60]
    s = [np.nan, 1.0, 0.8, 0.5, 0.05, 0.2, 0.01, 0.02]  # dips at 40, rises again: stable from 60
    assert stabilization_step(steps + [70], s, fraction=0.1, early_window=3) == 60
    assert stabilization_step(steps, s[:-1], fraction=0.1, early_window=3) is None  # only the last point: censored
    assert stabilization_step(steps, s[:-1], fraction=0.1, early_window=3, min_stable=1) == 60
    assert stabilization_step(steps, [np.nan, 1, 1, 1, 0.05, 0.04, 0.01], fraction=0.1) == 40
    assert stabilization_step(steps, [np.nan, 1, 1, 1, 1, 1, 1], fraction=0.1) is None
    assert stabilization_step(steps[:3], [np.nan, 1, 1], early_window=3) is None
    # warm-up: small first rates, peak later; the default early level is the peak
    warm = [np.nan, 0.1, 0.5, 2.0, 1.0, 0.15, 0.1]
    assert stabilization_step(steps, warm) == 50
    assert stabilization_step(steps, warm, early_window=1) is None


def test_settling_rule():
    steps = [0, 10, 20, 30, 40, 50]
    assert settling_step(steps, [1.0, 0.5, 0.08, 0.05, 0.02, 0.0]) == 20
    assert settling_step(steps, [1.0, 0.5, 0.08, 0.5, 0.02, 0.0]) is None  # one point before the end
    assert settling_step(steps, [1.0, 0.5, 0.08, 0.5, 0.02, 0.0], min_stable=1) == 40


def _batch(gen, n):
    a = torch.randint(0, 20, (n, 6), generator=gen)
    return torch.cat([a, a], 1)  # second half copies the first: learnable by induction


def _train(model, gen, steps, callback=None, save_dir=None, every=5):
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for step in range(steps + 1):
        if step:
            loss = model(_batch(gen, 16), return_type="loss")
            opt.zero_grad()
            loss.backward()
            opt.step()
        if callback is not None:
            callback.on_step(model, step)
        if save_dir is not None and step % every == 0:
            torch.save({k: v.half() for k, v in model.state_dict().items()}, save_dir / f"step_{step:06d}.pt")


def test_monitor_on_tiny_training_run_and_replay(gen, tmp_path):
    model = make_model(dtype=torch.float32, d_vocab=20, n_ctx=12).train()
    probe = _batch(torch.Generator().manual_seed(7), 4)
    mon = DynamicsMonitor(probe, every=5, key_token_ids=range(10), calibration_fn=lambda m: 0.5)
    n0 = hook_count(model)
    _train(model, gen, 30, mon, save_dir=tmp_path)
    assert model.training  # mode restored
    assert hook_count(model) == n0
    res = mon.result()
    assert list(res.steps) == [0, 5, 10, 15, 20, 25, 30]
    assert res.attention_drift.shape == (7, 2, 4) and np.isnan(res.attention_drift[0]).all()
    assert (res.attention_drift[1:] >= 0).all() and (res.attention_drift[1:] <= math.sqrt(math.log(2))).all()
    assert (res.value_drift[1:] > 0).all()
    assert np.isfinite(res.grad_scores_norm).all() and (res.grad_values_norm > 0).all()
    assert res.key_orthogonality.shape == (7, 2) and res.calibration.tolist() == [0.5] * 7
    state = json.loads(json.dumps(mon.state()))  # JSON-able
    back = DynamicsResult.from_state(state)
    np.testing.assert_allclose(back.attention_drift, res.attention_drift, equal_nan=True)
    assert back.frame_stabilization_step == res.frame_stabilization_step
    assert len(res.to_dataframe()) > 0
    d = json.loads(json.dumps(res.to_dict()))  # JSON-safe, NaN as float
    assert d["steps"] == [0, 5, 10, 15, 20, 25, 30] and d["frame_stabilization_step"] == res.frame_stabilization_step
    assert res.frame_distance_to_final.shape == (7,) and res.frame_distance_to_final[-1] == 0
    assert res.value_distance_to_final[0] > res.value_distance_to_final[-2] > 0
    np.testing.assert_allclose(back.value_distance_to_final, res.value_distance_to_final)
    # replay of the fp16 snapshots reproduces the online series (up to fp16 rounding)
    mon2 = DynamicsMonitor(probe, every=5, key_token_ids=range(10))
    rep = replay(tmp_path, make_model(dtype=torch.float32, d_vocab=20, n_ctx=12), mon2)
    assert list(rep.steps) == list(res.steps)
    early = replay(tmp_path, make_model(dtype=torch.float32, d_vocab=20, n_ctx=12),
                   DynamicsMonitor(probe, every=5, key_token_ids=range(10)), max_step=17)
    assert list(early.steps) == [0, 5, 10, 15]
    with pytest.raises(InputError, match="no snapshot at or before step -1"):
        replay(tmp_path, make_model(dtype=torch.float32, d_vocab=20, n_ctx=12), mon2, max_step=-1)
    np.testing.assert_allclose(rep.attention_drift[1:], res.attention_drift[1:], rtol=0.05, atol=1e-5)
    np.testing.assert_allclose(rep.value_drift[1:], res.value_drift[1:], rtol=0.05, atol=1e-4)
    import matplotlib

    matplotlib.use("Agg")
    ax = res.plot()
    assert ax is not None


def test_monitor_errors(tmp_path):
    with pytest.raises(ConfigError):
        DynamicsMonitor(torch.zeros(1, 4, dtype=torch.long), every=0)
    with pytest.raises(InputError):
        DynamicsMonitor(torch.zeros(1, 4))
    with pytest.raises(InputError, match="nothing"):
        DynamicsMonitor(torch.zeros(1, 4, dtype=torch.long)).result()
    with pytest.raises(CheckpointError):
        replay(tmp_path, make_model(dtype=torch.float32), probe_tokens=torch.zeros(1, 4, dtype=torch.long))


def test_monitor_plugs_into_the_training_loop():
    from bayesmanifold.models.presets import preset_spec
    from bayesmanifold.models.training import TrainConfig, train
    from bayesmanifold.windtunnels.bijection import BijectionTask

    task = BijectionTask(V=6, L=5)
    probe = task.sample(4, generator=1).tokens
    mon = DynamicsMonitor(probe, every=4, key_token_ids=task.answer_tokens.tolist())
    res = train(task, preset_spec("tiny", task), TrainConfig(steps=12, eval_every=12, n_eval=16, progress=False), callbacks=(mon,))
    state = res.history["callbacks"]["dynamics"]
    assert state["steps"] == [4, 8, 12]


@needs_hooked
def test_two_timescale_example_quick_mode():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "examples" / "two_timescale_monitor.py"
    spec = importlib.util.spec_from_file_location("two_timescale_monitor", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    s = mod.main(["--quick", "--steps", "20", "--every", "5"])
    assert s["n_checkpoints"] == 5 and 0 <= s["final_calibration"] < 3


def test_monitor_one_forward_pass_per_snapshot_and_forward_only(gen):
    """Patterns, values and gradient norms come from one pass; gradients=False is forward-only."""
    model = make_model(dtype=torch.float32, n_key_value_heads=2)
    probe = torch.randint(0, 50, (3, 8), generator=gen)
    calls = []
    handle = model.embed.register_forward_hook(lambda *a: calls.append(torch.is_grad_enabled()))
    try:
        with_grads = DynamicsMonitor(probe, every=1)
        with_grads.record(model, 0)
        assert len(calls) == 1
        calls.clear()
        fwd = DynamicsMonitor(probe, every=1, gradients=False)
        fwd.record(model, 0)
        assert calls == [False]
    finally:
        handle.remove()
    a, b = with_grads.records[0], fwd.records[0]
    np.testing.assert_array_equal(a.entropy, b.entropy)  # same patterns with and without backward
    assert np.isnan(b.grad_s).all() and np.isnan(b.loss) and (a.grad_v > 0).all()
    assert a.value_drift.shape == (2, 2) and a.grad_v.shape == (2, 2)  # per kv head under GQA
    assert all(p.grad is None for p in model.parameters())


def test_monitor_rejects_non_hooked_models_and_bad_value_layer():
    from bayesmanifold.errors import ModelError, SelectionError

    mon = DynamicsMonitor(torch.zeros(1, 4, dtype=torch.long), value_layer=5)
    with pytest.raises(ModelError):
        mon.record(torch.nn.Linear(2, 2), 0)
    with pytest.raises(SelectionError, match="out of range"):
        mon.record(make_model(dtype=torch.float32), 0)
    assert not mon.records
