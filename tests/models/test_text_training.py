"""Training on real text: the stdlib corpus task, attention-only models, `bayesmanifold train text`."""

import json
import sys

import pytest
import torch
from helpers import HAS_HOOKED

from bayesmanifold.cli import main
from bayesmanifold.errors import ConfigError, ModelError, TaskError
from bayesmanifold.models.checkpoint import load_checkpoint, read_config
from bayesmanifold.models.presets import ModelSpec, build_model, preset_spec
from bayesmanifold.models.snapshots import list_snapshots
from bayesmanifold.windtunnels.registry import task_from_dict
from bayesmanifold.windtunnels.text_corpus import TextCorpusTask, corpus_files


def test_stdlib_corpus_split_and_description():
    files = corpus_files("stdlib")
    assert len(files) > 100 and all(f.endswith(".py") for f in files)
    assert not any(part in ("test", "tests", "site-packages") or part.startswith("idle_test")
                   for f in files for part in f.split("/")[:-1])
    task = TextCorpusTask(seq_len=32, max_files=10)
    d = task.describe()
    assert d["python_version"] == sys.version.split()[0] and len(d["sha256"]) == 64
    assert set(d["train_files"]).isdisjoint(d["heldout_files"]) and len(d["train_files"]) + len(d["heldout_files"]) == 10
    assert len(d["heldout_files"]) == 1  # of 10 files (holdout_every=20) only file 0 is held out
    b = task.sample(3, generator=torch.Generator().manual_seed(0))
    assert b.tokens.shape == (3, 32) and int(b.tokens.max()) < 256 and torch.equal(b.targets, b.tokens[:, 1:])
    again = task.sample(3, generator=torch.Generator().manual_seed(0))
    assert torch.equal(b.tokens, again.tokens)
    assert task_from_dict(task.to_dict()) == task
    w = task.heldout_windows(4)
    assert w.shape == (4, 32) and torch.equal(w, task.heldout_windows(4))


def test_text_task_bad_parameters(tmp_path):
    with pytest.raises(TaskError, match="not a directory"):
        TextCorpusTask(corpus=str(tmp_path / "none"))._data()
    (tmp_path / "a.py").write_text("x = 1\n")
    with pytest.raises(TaskError, match="at least 2"):
        TextCorpusTask(corpus=str(tmp_path))._data()
    (tmp_path / "b.py").write_text("y = 2\n")
    with pytest.raises(TaskError, match="fewer than seq_len"):
        TextCorpusTask(corpus=str(tmp_path), seq_len=64)._data()
    with pytest.raises(TaskError):
        TextCorpusTask(seq_len=1)


def test_attention_only_spec():
    task = TextCorpusTask(seq_len=16, max_files=4)
    spec = preset_spec("stdlib-attn2", task)
    assert spec.attn_only and spec.to_dict()["attn_only"] is True and spec.positional == "standard"
    assert "positional" not in spec.to_dict()  # configs with learned positions stay as they were
    model = build_model(spec)
    assert model.cfg.attn_only and not any("mlp" in n for n, _ in model.named_parameters())
    rope = build_model(preset_spec("stdlib-attn2-rope", task))
    short = preset_spec("stdlib-attn2-short", task)
    if HAS_HOOKED:
        assert build_model(short).cfg.positional_embedding_type == "shortformer"
    else:  # TransformerLens 4 has no native shortformer: a clear error, not a different model
        with pytest.raises(ModelError, match="shortformer"):
            build_model(short)
    assert rope.cfg.positional_embedding_type == "rotary" and rope.cfg.rotary_dim == 16 and rope.cfg.attn_only
    assert build_model(preset_spec("stdlib-attn2-d128", task)).cfg.d_head == 32
    assert ModelSpec.from_dict(spec.to_dict()) == spec
    mlp = preset_spec("stdlib-mlp2", task)
    assert "attn_only" not in mlp.to_dict() and "rotary" not in mlp.to_dict()  # other configs stay as they were
    assert any("mlp" in n for n, _ in build_model(mlp).named_parameters())


def test_train_text_end_to_end(tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["train", "text", "--param", "max_files=8", "--param", "seq_len=32", "--preset", "stdlib-attn2",
            "--steps", "12", "--batch-size", "4", "--eval-every", "6", "--n-eval", "4", "--snapshots", "4",
            "--snapshot-every", "6", "--no-progress", "--threads", "1", "--out", str(out)]
    assert main(argv) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["task"] == "text" and summary["heldout_loss"] < 5.6  # below uniform over bytes (ln 256)
    cfg = read_config(out)
    assert cfg["complete"] and cfg["model"]["attn_only"] and "--snapshot-every 6" in cfg["command"]
    corpus = json.loads((out / "corpus.json").read_text())
    assert corpus["n_files"] == 8 and corpus["tokenization"].startswith("utf8-bytes")
    steps = [s for s, _ in list_snapshots(out)]
    assert steps == [0, 1, 3, 6, 12]
    hist = json.loads((out / "history.json").read_text())
    assert [e["step"] for e in hist["eval"]] == [6, 12] and all("heldout_loss" in e for e in hist["eval"])
    model, task, _, _ = load_checkpoint(out)
    assert isinstance(task, TextCorpusTask)
    again = task.evaluate(model, n=4)["heldout_loss"]
    assert again == pytest.approx(hist["eval"][-1]["heldout_loss"], rel=1e-6)


@pytest.mark.parametrize("name", ["stdlib-attn2", "stdlib-mlp2"])
def test_shipped_text_checkpoints_remeasure(name):
    """The shipped real-text models load; their recorded induction scores and held-out loss are
    re-measured on a tiny evaluation (the held-out loss needs the same stdlib files)."""
    import numpy as np

    from bayesmanifold.analyses import induction_scores
    from bayesmanifold.models.checkpoint import shipped_dir

    d = shipped_dir() / name
    model, task, cfg, hist = load_checkpoint(name)
    metrics = json.loads((d / "metrics.json").read_text())
    steps = [s for s, _ in list_snapshots(name)]
    assert len(steps) >= 15 and steps[0] == 0 and steps[-1] == cfg["step"]
    probe = metrics["induction_probe"]
    tiny = induction_scores(model, n_seqs=metrics["induction_tiny"]["n_seqs"], half=probe["half"], seed=probe["seed"])
    np.testing.assert_allclose(tiny.score, metrics["induction_tiny"]["scores"], rtol=1e-4, atol=1e-6)
    if name == "stdlib-attn2":  # BPE: induction heads formed in layer 1, and a previous-token head in layer 0
        uniform = probe["uniform_level"]
        ind = [h for h in metrics["heads"] if h["layer"] == 1 and h["induction_score"] >= 10 * uniform]
        assert ind and all(h["rise_step"] is not None and 0 < h["rise_step"] < cfg["step"] for h in ind)
        assert max(tiny.score[4:]) >= 8 * uniform  # the live tiny measure sees it too (layer 1 = heads 4..7)
        assert max(h["prev_token_score"] for h in metrics["heads"] if h["layer"] == 0) > 0.2
    total = sum(f.stat().st_size for f in shipped_dir().rglob("*") if f.is_file())
    assert total <= 30_000_000, f"shipped checkpoints take {total} bytes"  # 30 MB since the size-trend models (issue 26)
    corpus = json.loads((d / "corpus.json").read_text())
    if task.describe()["sha256"] != corpus["sha256"]:
        pytest.skip(f"this interpreter's stdlib differs from the one {name} was trained on (Python {corpus['python_version']})")
    if task.bpe_vocab:  # the shipped tokenizer is the one the task learns again from the same files
        assert model.tokenizer.get_vocab() == task._data()["tokenizer"].get_vocab()
    again = task.evaluate(model, n=metrics["n_tiny_windows"])["heldout_loss"]
    assert again == pytest.approx(metrics["heldout_loss_tiny"], rel=1e-5)
    assert metrics["heldout_loss"] == pytest.approx(hist["eval"][-1]["heldout_loss"], rel=1e-6)


def test_configs_with_the_former_rotary_flag_still_load():
    """Configs written before ``positional`` existed recorded ``rotary`` (a bool)."""
    task = TextCorpusTask(seq_len=16, max_files=4)
    d = preset_spec("stdlib-attn2-rope", task).to_dict()
    old = {k: v for k, v in d.items() if k != "positional"} | {"rotary": True}
    assert ModelSpec.from_dict(old) == ModelSpec.from_dict(d)
    plain = {k: v for k, v in d.items() if k != "positional"} | {"rotary": False}
    assert ModelSpec.from_dict(plain).positional == "standard"
    with pytest.raises(ConfigError, match="unknown ModelSpec fields"):
        ModelSpec.from_dict(d | {"rotary": True})  # both: ambiguous, refused


def test_bpe_text_task():
    """A BPE vocabulary learned from the training files: ids in range, <|endoftext|> between
    files, the held-out files decode back to their text, configs without BPE stay as they were."""
    from bayesmanifold.windtunnels.bpe import EOT
    from bayesmanifold.windtunnels.text_corpus import _root

    task = TextCorpusTask(seq_len=32, max_files=8, bpe_vocab=300)
    assert task.d_vocab == 300 and task.to_dict()["bpe_vocab"] == 300 and task_from_dict(task.to_dict()) == task
    assert "bpe_vocab" not in TextCorpusTask(seq_len=32, max_files=8).to_dict()
    d = task._data()
    tok = d["tokenizer"]
    assert tok.get_vocab_size() == 300 and tok.token_to_id(EOT) == 0
    desc = task.describe()
    assert desc["tokenization"].startswith("byte-level BPE, 300 tokens")
    assert (d["train"] == 0).sum() == len(desc["train_files"]) and (d["held"] == 0).sum() == len(desc["heldout_files"])
    held_text = (_root("stdlib") / desc["heldout_files"][0]).read_text(encoding="utf-8")
    assert tok.decode(d["held"][:-1].tolist()) == held_text  # one held-out file, then <|endoftext|>
    assert desc["n_heldout_tokens"] < desc["n_heldout_bytes"]  # merges shorten the stream
    b = task.sample(4, generator=0)
    assert b.tokens.shape == (4, 32) and 0 <= int(b.tokens.min()) and int(b.tokens.max()) < 300
    for bad in (1, 100, 257):
        with pytest.raises(TaskError, match="bpe_vocab"):
            TextCorpusTask(bpe_vocab=bad)


def test_train_text_bpe_end_to_end(tmp_path, capsys):
    """A BPE text checkpoint saves its tokenizer; the loaded model and its snapshots read text with
    it (prompts, token strings), and the held-out loss re-measures."""
    from bayesmanifold.analyses import induction_scores
    from bayesmanifold.analyses.routing_maps import prompt_tokens, token_strings
    from bayesmanifold.models.snapshots import load_snapshot

    out = tmp_path / "run"
    argv = ["train", "text", "--param", "max_files=8", "--param", "seq_len=32", "--param", "bpe_vocab=300",
            "--preset", "stdlib-attn2", "--steps", "8", "--batch-size", "4", "--eval-every", "4", "--n-eval", "4",
            "--snapshots", "3", "--no-progress", "--threads", "1", "--out", str(out)]
    assert main(argv) == 0
    capsys.readouterr()
    assert (out / "tokenizer" / "tokenizer.json").is_file()
    assert json.loads((out / "corpus.json").read_text())["tokenization"].startswith("byte-level BPE")
    model, task, cfg, hist = load_checkpoint(out)
    assert cfg["model"]["d_vocab"] == 300 and model.tokenizer is not None
    text = "def f(self):\n    return self.x\n"
    ids = prompt_tokens(model, text)[0].tolist()
    assert ids == task._data()["tokenizer"].encode(text).ids  # no BOS: the model was trained without one
    assert "".join(token_strings(model, ids)) == text
    step = list_snapshots(out)[0][0]
    assert load_snapshot(out, step).tokenizer is not None
    assert task.evaluate(model, n=4)["heldout_loss"] == pytest.approx(hist["eval"][-1]["heldout_loss"], rel=1e-6)
    from bayesmanifold.analyses.induction import ordinary_ids
    from bayesmanifold.backends import model_access

    assert ordinary_ids(model_access(model)) == (1, 300)  # random probe ids: never <|endoftext|> (id 0)
    assert induction_scores(model, n_seqs=2, half=8).score.shape == (8,)
