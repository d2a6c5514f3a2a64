"""The wind-tunnel commands end to end: train (and resume), calibrate --json, checkpoints."""

import json

import torch

from bayesmanifold.cli import main


def test_train_calibrate_and_list(tmp_path, capsys):
    out = tmp_path / "run"
    args = ["train", "bijection", "--param", "V=6", "--param", "L=5", "--preset", "tiny",
            "--steps", "5", "--seed", "3", "--n-eval", "16", "--snapshots", "3", "--no-progress",
            "--out", str(out)]
    assert main(args) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["steps"] == 5 and summary["arch"] == "transformer"
    conf = json.loads((out / "config.json").read_text())
    assert conf["complete"] and conf["seed"] == 3 and conf["task"]["V"] == 6
    assert conf["command"].startswith("bayesmanifold train bijection")
    assert sorted(p.name for p in (out / "snapshots").iterdir()) == [
        "step_000000.pt", "step_000001.pt", "step_000005.pt"]
    assert main(args) == 0  # a finished run: loaded, not retrained
    warm = args[:-1] + [str(tmp_path / "warm"), "--init-from", str(out)]
    assert main(warm) == 0
    assert json.loads((tmp_path / "warm" / "config.json").read_text())["init_from"] == str(out)
    other = [a if a != "tiny" else "small" for a in warm[:-3]] + [str(tmp_path / "w2"),
                                                                  "--init-from", str(out)]
    assert main(other) == 2  # the warm start must be the same architecture

    js = tmp_path / "cal.json"
    assert main(["calibrate", str(out), "--n-seqs", "20", "--json", str(js)]) == 0
    data = json.loads(js.read_text())
    for key in ("task", "arch", "entropy_mae_bits", "kl_bits", "n_seqs"):
        assert key in data
    assert data["n_seqs"] == 20 and len(data["kl_bits"]) == 5 and data["task"] == "bijection"
    assert main(["calibrate", str(out), "--k", "30"]) == 2  # --k is for HMM checkpoints
    assert main(["calibrate", str(tmp_path / "nope")]) == 2

    capsys.readouterr()
    assert main(["checkpoints", "--json", str(tmp_path / "list.json")]) == 0
    listing = json.loads((tmp_path / "list.json").read_text())["checkpoints"]
    assert isinstance(listing, list)
    for row in listing:
        assert {"name", "task", "arch", "n_params", "entropy_mae_bits"} <= set(row)


def test_train_hmm_lstm_and_bad_input(tmp_path, capsys):
    out = tmp_path / "hmm"
    assert main(["train", "hmm", "--param", "K=4", "--arch", "lstm", "--preset", "tiny",
                 "--steps", "3", "--n-eval", "8", "--no-progress", "--out", str(out)]) == 0
    js = tmp_path / "hmm.json"
    assert main(["calibrate", str(out), "--k", "6", "--n-seqs", "8", "--json", str(js)]) == 0
    refs = json.loads(js.read_text())["window_filter_kl_bits"]
    assert list(refs) == ["1", "2", "3"] and refs["1"] > refs["2"] > refs["3"] > 0
    assert main(["calibrate", str(out), "--k", "500"]) == 2  # beyond n_ctx
    assert main(["train", "bijection", "--param", "L=30", "--steps", "2", "--out",
                 str(tmp_path / "x")]) == 2  # L > V without replacement
    assert main(["train", "hmm", "--param", "S=1", "--steps", "2", "--out",
                 str(tmp_path / "y")]) == 2
    err = capsys.readouterr().err
    assert "TaskError" not in err and "S (states)" in err


def test_warm_start_continues_the_lineage(tmp_path):
    """A warm-started run carries its parent's snapshots and numbers its own cumulatively."""
    from bayesmanifold.models import load_checkpoint, load_snapshot
    from bayesmanifold.models.snapshots import list_snapshots

    base = ["train", "bijection", "--param", "V=6", "--param", "L=5", "--preset", "tiny",
            "--n-eval", "8", "--no-progress", "--seed", "1"]
    a, b, c = (tmp_path / n for n in "abc")
    assert main(base + ["--steps", "6", "--snapshots", "3", "--out", str(a)]) == 0
    assert main(base + ["--steps", "4", "--snapshots", "2", "--loss", "soft",
                        "--init-from", str(a), "--out", str(b)]) == 0
    assert main(base + ["--steps", "3", "--init-from", str(b), "--out", str(c)]) == 0
    assert [s for s, _ in list_snapshots(a)] == [0, 1, 6]
    assert [s for s, _ in list_snapshots(b)] == [0, 1, 6, 10]  # 6 = a's end = b's start
    assert [s for s, _ in list_snapshots(c)] == [0, 1, 6, 10]  # c asked for none of its own
    cb, cc = (json.loads((d / "config.json").read_text()) for d in (b, c))
    assert cb["step_offset"] == 6 and cc["step_offset"] == 10
    assert [st["checkpoint"] for st in cc["lineage"]] == [str(a), str(b)]
    assert [st["steps"] for st in cc["lineage"]] == [6, 4]
    assert cc["lineage"][1]["command"] == cb["command"] and "--loss soft" in cb["command"]
    # b's last snapshot is b's final model (fp16); a's snapshots are a's own weights
    final, _, _, _ = load_checkpoint(b)
    snap = load_snapshot(b, 10)
    for (k, v), w in zip(final.state_dict().items(), snap.state_dict().values()):
        assert v.shape == w.shape and torch.allclose(v.double(), w.double(), atol=1e-2), k
    assert (list_snapshots(b)[1][1].read_bytes() == list_snapshots(a)[1][1].read_bytes())
    # a fresh run records no lineage
    ca = json.loads((a / "config.json").read_text())
    assert ca["step_offset"] == 0 and ca["lineage"] == []
