"""``bayesmanifold analyze``: JSON keys on a toy model, prompts, and a tiny checkpoint with snapshots."""

import json

import torch

from bayesmanifold.cli import main

KEYS = {
    "key_orthogonality",
    "value_pc1",
    "value_pc12",
    "participation_ratio",
    "spearman_pc1_entropy",
    "attention_entropy_reduction",
    "specialization",
}


def test_analyze_toy_random_tokens(tmp_path):
    out = tmp_path / "a.json"
    assert main(["analyze", "toy", "--json", str(out), "--out", str(tmp_path / "figs")]) == 0
    data = json.loads(out.read_text())
    assert KEYS <= set(data)
    assert len(data["key_orthogonality"]) == 2
    assert data["figures"] and all((tmp_path / "figs").joinpath(f.split("/")[-1]).is_file() for f in data["figures"])


def test_analyze_prompts(tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("one two three\nfour five six\nseven eight\nnine ten eleven twelve\n")
    out = tmp_path / "p.json"
    assert main(["analyze", "toy", "--prompts", str(prompts), "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert KEYS <= set(data) and data["mode"] == "prompts"
    assert set(data["paper3"]["criteria"]) == {"value_manifold", "key_orthogonality", "attention_focusing"}


def test_analyze_checkpoint_with_snapshots(tmp_path):
    from bayesmanifold.models.presets import preset_spec
    from bayesmanifold.models.training import TrainConfig, train
    from bayesmanifold.windtunnels.bijection import BijectionTask

    task = BijectionTask(V=6, L=5)
    cfg = TrainConfig(steps=40, eval_every=40, n_eval=16, progress=False, snapshot_steps=(0, 5, 10, 15, 20, 30, 40), batch_size=16)
    train(task, preset_spec("tiny", task), cfg, out_dir=tmp_path / "ck")
    out = tmp_path / "c.json"
    assert main(["analyze", str(tmp_path / "ck"), "--n-seqs", "16", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert KEYS <= set(data) and data["mode"] == "windtunnel"
    assert {"frame_stabilization_step", "precision_stabilization_step"} <= set(data)
    assert data["dynamics_source"].startswith("replay")
    assert set(data["specialization"]) == {"L0H0", "L0H1"}

    # a warm-started second stage: by default only the from-scratch stage is replayed
    cfg2 = TrainConfig(steps=10, eval_every=10, n_eval=16, progress=False, snapshot_steps=(5, 10),
                       batch_size=16, loss="soft")
    from bayesmanifold.models import load_checkpoint

    m, _, _, _ = load_checkpoint(tmp_path / "ck")
    train(task, preset_spec("tiny", task), cfg2, model=m.train(), out_dir=tmp_path / "ck2",
          init_from=str(tmp_path / "ck"))
    first, every = tmp_path / "d1.json", tmp_path / "d2.json"
    assert main(["analyze", str(tmp_path / "ck2"), "--n-seqs", "16", "--json", str(first)]) == 0
    assert main(["analyze", str(tmp_path / "ck2"), "--n-seqs", "16", "--json", str(every),
                 "--dynamics-range", "all"]) == 0
    d1, d2 = json.loads(first.read_text()), json.loads(every.read_text())
    assert d1["dynamics"]["n_checkpoints"] == 7 and "steps 0–40 (the from-scratch stage, 1 of 2" in d1["dynamics_source"]
    assert d2["dynamics"]["n_checkpoints"] == 9 and "steps 0–50" in d2["dynamics_source"]


def test_analyze_errors(tmp_path, capsys):
    assert main(["analyze", "toy", "--prompts", str(tmp_path / "nope.txt")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["analyze"]) == 2  # a usage error: one line, exit 2 (no SystemExit from main)
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "required" in err


def _count_passes(model, monkeypatch):
    """Count the model's forward passes (its forward wrapped on the instance)."""
    calls, forward = [], model.forward

    def counted(*a, **k):
        calls.append(1)
        return forward(*a, **k)

    monkeypatch.setattr(model, "forward", counted)
    return calls


def test_suite_is_a_value_and_runs_one_pass_per_batch(tmp_path, monkeypatch):
    from bayesmanifold.suite import SuiteConfig, SuiteResult, Target, load_target, run_suite
    from bayesmanifold.windtunnels.bijection import BijectionTask

    monkeypatch.chdir(tmp_path)
    target = load_target("toy")
    calls = _count_passes(target.model, monkeypatch)
    res = run_suite(target, SuiteConfig(seed=1))
    assert isinstance(res, SuiteResult) and res.mode == "random-tokens"
    assert len(calls) == 1  # manifold, attention entropy and the per-sequence specialization: one pass
    assert list(res.to_dataframe().columns) == ["layer", "key_orthogonality", "attention_entropy"]
    assert json.loads(json.dumps(res.to_dict()))["mode"] == "random-tokens"
    assert res.plot() is not None and res.figure_names == ["key_orthogonality", "value_manifold", "attention_entropy"]
    assert list(tmp_path.iterdir()) == []  # the suite writes no file

    task = BijectionTask(V=6, L=5)
    from helpers import make_model

    model = make_model(torch.float32, 0, d_vocab=task.d_vocab, n_ctx=task.seq_len)
    calls = _count_passes(model, monkeypatch)
    res = run_suite(Target(model, task), SuiteConfig(n_seqs=200, dynamics=False))
    assert len(calls) == 2  # 200 sequences in batches of 128
    assert "query_key_alignment" in res.to_dataframe().columns
    assert set(res.to_dict()["manifolds"]) == {"residual", "values_concat"}


def test_analyze_protocol_authors_beside_ours(tmp_path, capsys):
    from bayesmanifold.models.presets import preset_spec
    from bayesmanifold.models.training import TrainConfig, train
    from bayesmanifold.windtunnels.bijection import BijectionTask

    task = BijectionTask(V=6, L=5)
    train(task, preset_spec("small", task), TrainConfig(steps=20, eval_every=20, n_eval=16, progress=False, batch_size=16),
          out_dir=tmp_path / "ck")
    out = tmp_path / "a.json"
    assert main(["analyze", str(tmp_path / "ck"), "--n-seqs", "16", "--no-dynamics", "--protocol", "authors",
                 "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "authors' protocol beside ours" in text and "value positions: PC1" in text
    data = json.loads(out.read_text())
    assert {"value_positions", "prefix_last"} <= set(data["protocols"]["value_manifold"])
    claims = {c["claim"].split(" ")[0]: c for c in data["claims"]}
    red = data["protocols"]["attention_focusing"]["elimination"]["reduction"]
    assert claims["Attention"]["authors_measured"].startswith(f"{100 * red:.0f}% at elimination positions")
    assert claims["Attention"]["authors_held"] is (red >= 0.8)
    assert main(["analyze", "toy", "--protocol", "authors"]) == 2
    assert "wind-tunnel" in capsys.readouterr().err
