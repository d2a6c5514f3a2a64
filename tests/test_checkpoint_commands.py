"""Every shipped checkpoint through every command that accepts a checkpoint (issue 27, item 5):
it works, or it is refused at once (before the model is loaded) with the true reason, on one line
with exit code 2. Also: an unfinished training directory is refused by every such command, and
``calibrate --record`` never rewrites the installed package nor a recorded measurement silently.

Fast settings: each (task, architecture, preset) family runs each accepting command once on its
first checkpoint (the others of the family share its code path: they pass the same pre-work gate,
checked here, and differ only in weights); ``report`` runs on the HMM transformer (whose last
scored position has no next token) and a text model; every refusal is checked for every checkpoint.
"""

import json
import shutil

import pytest

import bayesmanifold.models.checkpoint as ck
from bayesmanifold.cli import main

ROWS = {r["name"]: r for r in ck.list_shipped()}
COMMANDS = ["calibrate", "analyze", "map", "report"]
REPORT_RUNS = {"hmm-k20", "stdlib-mlp2"}


def _family(name: str) -> tuple:
    r = ROWS[name]
    return r["task"], r["arch"], r["preset"]


FIRST_OF_FAMILY = {name for name in sorted(ROWS) if name == min(n for n in ROWS if _family(n) == _family(name))}


def _refusal(name: str, command: str) -> str | None:
    """The reason ``command`` must refuse ``name`` with (None: it must work)."""
    task, arch, _ = _family(name)
    if command == "calibrate":
        return "is a text model: calibration needs a task with an exact posterior" if task == "text" else None
    if arch != "transformer":
        return "baseline, not an attention model"
    if command == "map" and task != "text":
        return "wind-tunnel model with no tokenizer"
    return None


def _argv(name: str, command: str, tmp_path) -> list[str]:
    return {
        "calibrate": ["calibrate", name, "--n-seqs", "4", "--batch-size", "4"],
        "analyze": ["analyze", name, "--n-seqs", "8", "--no-dynamics"],
        "map": ["map", name, "--prompt", "def f(x):\n    return x + 1\n", "--out", str(tmp_path / "m.html")],
        "report": ["report", name, "--quick", "--no-progress", "--out", str(tmp_path / "r")],
    }[command]


def _no_loading(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("the checkpoint was loaded before the command refused it")

    monkeypatch.setattr(ck, "load_checkpoint", refuse)


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "Traceback" not in err, err
    return err


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("name", sorted(ROWS))
def test_every_shipped_checkpoint_through_every_command(name, command, tmp_path, capsys, monkeypatch):
    reason = _refusal(name, command)
    if reason is not None:
        _no_loading(monkeypatch)
        assert main(_argv(name, command, tmp_path)) == 2
        assert reason in _one_line_error(capsys)
        return
    runs = name in REPORT_RUNS if command == "report" else name in FIRST_OF_FAMILY
    if not runs:  # same family as a checkpoint that runs: the same gate passes, its config reads
        ck.refuse_unusable(name, command=command, exact_posterior=command == "calibrate", attention=command != "calibrate",
                           text=command == "map")
        assert ck.read_config(name)["complete"]
        return
    code = main(_argv(name, command, tmp_path))
    assert code == 0, capsys.readouterr().err


@pytest.fixture
def unfinished(tmp_path):
    """A copy of a shipped checkpoint made to look like an interrupted training run."""
    d = tmp_path / "run"
    shutil.copytree(ck.shipped_dir() / "bijection-v20-mlp", d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["complete"], cfg["step"] = False, 100
    (d / "config.json").write_text(json.dumps(cfg))
    (d / "train_state.pt").write_bytes(b"resume state")
    return d


@pytest.mark.parametrize("command", COMMANDS + ["train"])
def test_an_unfinished_training_run_is_refused_at_once(unfinished, command, tmp_path, capsys, monkeypatch):
    _no_loading(monkeypatch)
    argv = (["train", "bijection", "--arch", "mlp", "--steps", "1", "--init-from", str(unfinished), "--out", str(tmp_path / "t")]
            if command == "train" else _argv(str(unfinished), command, tmp_path))
    assert main(argv) == 2
    err = _one_line_error(capsys)
    assert "unfinished training run (weights of step 100" in err and "train_state.pt" in err


def test_calibrate_record_never_writes_the_package_nor_silently(tmp_path, capsys, monkeypatch):
    shipped = ck.shipped_dir() / "bijection-v20-mlp" / "metrics.json"
    before = shipped.read_bytes()
    assert main(["calibrate", "bijection-v20-mlp", "--n-seqs", "4", "--record"]) == 2
    assert "shipped inside the installed package" in _one_line_error(capsys)
    assert shipped.read_bytes() == before
    d = tmp_path / "copy"
    shutil.copytree(ck.shipped_dir() / "bijection-v20-mlp", d)
    argv = ["calibrate", str(d), "--n-seqs", "4", "--quick-n-seqs", "4", "--batch-size", "4", "--record"]
    assert main(argv) == 2
    assert "--overwrite" in _one_line_error(capsys)
    assert main(argv + ["--overwrite"]) == 0
    assert json.loads((d / "metrics.json").read_text())["n_seqs"] == 4
    assert main(["calibrate", str(d), "--n-seqs", "4", "--overwrite"]) == 2  # --overwrite without --record
    assert "--record" in _one_line_error(capsys)


def test_report_never_replaces_a_directory_it_did_not_write(tmp_path, capsys):
    """``report --out DIR`` replaces DIR as a whole: only an empty directory or an earlier report."""
    d = tmp_path / "mine"
    d.mkdir()
    (d / "notes.txt").write_text("precious")
    assert main(["report", "toy", "--quick", "--no-progress", "--out", str(d)]) == 2
    assert "holds files a report does not write (notes.txt)" in _one_line_error(capsys)
    assert (d / "notes.txt").read_text() == "precious"
