"""The report: self-contained HTML, summary.json, atomic replacement, one-line errors."""

import json

import pytest

from bayesmanifold.cli import main
from bayesmanifold.report import Report


def test_report_on_toy_model(tmp_path, capsys):
    out = tmp_path / "rep"
    assert main(["report", "toy", "--out", str(out), "--quick", "--no-progress", "--json", str(tmp_path / "s.json")]) == 0
    html = (out / "index.html").read_text()
    summary = json.loads((out / "summary.json").read_text())
    assert "data:image/png;base64," in html and "http://" not in html and "https://" not in html
    assert summary["routing_law"]["max_rel_residual_dscores"] <= 1e-10
    assert any(c["claim"].startswith("Routing law") and c["held"] for c in summary["claims"])
    assert sorted(p.name for p in out.glob("*.png"))  # the figures beside the HTML
    assert json.loads((tmp_path / "s.json").read_text())["target"] == "toy"
    text = capsys.readouterr().out.strip().splitlines()
    assert len(text) <= 10 and text[-1].endswith("index.html")


def test_demo_quick_on_shipped_checkpoint(tmp_path):
    out = tmp_path / "report"
    assert main(["demo", "--quick", "--out", str(out), "--no-progress"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    names = [c["claim"] for c in summary["claims"]]
    assert any("EM-like" in n for n in names) and any("Bayesian posterior" in n for n in names)
    assert summary["calibration"]["entropy_mae_bits"] < 0.1
    assert "em_vs_sgd" in summary and "em_vs_sgd_recorded" in summary


def test_interrupted_report_leaves_previous_one(tmp_path, monkeypatch):
    out = tmp_path / "rep"
    rep = Report("first")
    rep.claim("c", "1", "1", True)
    rep.write(out, {"n": 1})
    import bayesmanifold.demo as demo

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(demo, "verify_routing_law", boom)
    assert main(["report", "toy", "--out", str(out), "--quick", "--no-progress"]) == 130
    assert json.loads((out / "summary.json").read_text()) == {"n": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["rep"]  # no temporary directory left


def test_report_errors(tmp_path, capsys):
    f = tmp_path / "file"
    f.write_text("x")
    assert main(["report", "toy", "--out", str(f / "sub"), "--quick", "--no-progress"]) == 2
    assert "not a directory" in capsys.readouterr().err
    assert main(["report", "bijection-v20-lstm", "--out", str(tmp_path / "r"), "--quick", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert "not an attention model" in err and err.count("\n") == 0


@pytest.mark.parametrize("held,mark", [(True, "ok"), (False, "no"), (None, "na")])
def test_claim_marks(held, mark, tmp_path):
    rep = Report("t")
    rep.claim("c", "m", "p", held)
    assert f"class='{mark}'" in rep.render_html()
