"""The accelerator script end to end at tiny size on CPU, its schedule and config, and the size trend."""

import json

import pytest
import torch

from bayesmanifold.cli import main
from bayesmanifold.errors import ConfigError
from bayesmanifold.experiments.paper_size import PAPER_SCHEDULES, PaperRunConfig, snapshot_schedule


def test_snapshot_schedule_is_dense_then_log_spaced():
    s = snapshot_schedule(100_000)
    assert s[:11] == tuple(range(0, 1001, 100)) and s[-1] == 100_000
    later = [b / a for a, b in zip(s[10:], s[11:])]
    assert len(s) == 31 and max(later) / min(later) < 1.01  # equal ratios: log-spaced
    assert snapshot_schedule(250) == (0, 100, 200, 250)


def test_paper_schedules_and_config():
    assert PAPER_SCHEDULES["bijection-paper"] == {"task": "bijection", "steps": 100_000, "batch_size": 128, "lr": 3e-4,
                                                  "warmup": 2000, "loss": "hard"}
    assert PAPER_SCHEDULES["hmm-paper"]["loss"] == "soft"
    c = PaperRunConfig(preset="tiny", task="bijection", steps=10)
    assert c.schedule()["steps"] == 10 and c.schedule()["lr"] == 3e-4
    assert PaperRunConfig.from_dict(c.to_dict()) == c
    for bad in ({"preset": "nope"}, {"device": "tpu"}, {"steps": 0}, {"time_budget_s": -1.0},
                {"preset": "tiny"}, {"loss": "l2"}, {"task": "recall"}):
        with pytest.raises(ConfigError):
            PaperRunConfig(**bad)


def test_run_end_to_end_tiny_on_cpu(tmp_path, capsys):
    out = tmp_path / "run"
    js = tmp_path / "run.json"
    assert main(["paper-size", "run", "--preset", "tiny", "--task", "bijection", "--steps", "30", "--device", "cpu",
                 "--quick-report", "--keep-snapshots", "--no-progress", "--out", str(out), "--json", str(js)]) == 0
    n = json.loads((out / "paper_size.json").read_text())
    assert n == json.loads(js.read_text())
    assert n["plan"]["steps"] == 30 and n["plan"]["step_time_s"] > 0
    assert n["plan"]["snapshots"] == [0, 30]
    claims = {c["claim"]: c for c in n["claims"]}
    assert any(c["authors_measured"] for c in claims.values())
    assert "value_positions" in n["protocols"]["value_manifold"]
    sd = torch.load(out / "checkpoint" / "model.pt", weights_only=True)
    assert all(v.dtype == torch.float16 for v in sd.values() if v.is_floating_point())
    assert (out / "report" / "index.html").is_file() and "authors' protocol, this model" in (out / "report" / "index.html").read_text()
    assert "paper-size run on cpu: 30 of the paper's 30 steps" in capsys.readouterr().out
    # the trend reads the fp16 checkpoint and one of its snapshots
    tj = tmp_path / "trend.json"
    assert main(["paper-size", "trend", str(out / "checkpoint"), f"{out / 'checkpoint'}@0", "--n-seqs", "16",
                 "--json", str(tj)]) == 0
    rows = json.loads(tj.read_text())["rows"]
    assert [r["step"] for r in rows] == [30, 0]
    assert all(0 < r["authors_pc1_values"] <= 1 for r in rows)
    assert rows[0]["authors_pc1_values"] != rows[1]["authors_pc1_values"]  # trained weights differ from the init


def test_run_refuses_cuda_without_cuda_and_a_used_directory(tmp_path):
    from bayesmanifold.experiments.paper_size import run_paper_size

    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="CUDA"):
            run_paper_size(PaperRunConfig(preset="tiny", task="bijection", steps=2, device="cuda"), tmp_path / "x")
    (tmp_path / "y" / "checkpoint").mkdir(parents=True)
    (tmp_path / "y" / "checkpoint" / "f").write_text("")
    with pytest.raises(ConfigError, match="not empty"):
        run_paper_size(PaperRunConfig(preset="tiny", task="bijection", steps=2, device="cpu"), tmp_path / "y")
