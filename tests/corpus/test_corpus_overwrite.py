"""Issue 27, items 3, 4 and 7 for scan and merge: outputs checked before any work, no silent
overwrite or deletion, devices and layer indices refused in one line with exit 2."""

import json
from pathlib import Path

import pytest

from bayesmanifold.cli import main

ARGS = ["--seq-len", "16", "--batch-size", "2", "--max-tokens", "64", "--no-figures"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    f = tmp_path_factory.mktemp("ow") / "corpus.txt"
    f.write_text("".join(p.read_text() for p in sorted(Path(json.__file__).parent.glob("*.py"))[:1]))
    return f


def _err(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "Traceback" not in err
    return err


def test_scan_refuses_to_delete_an_interrupted_run(corpus, tmp_path, capsys):
    out = tmp_path / "run"
    (out / "checkpoints").mkdir(parents=True)
    ckpt = out / "checkpoints" / "rank0-of-1.pt"
    ckpt.write_bytes(b"an interrupted run's state")
    assert main(["scan", "toy", "--data", str(corpus), *ARGS, "--out", str(out)]) == 2
    err = _err(capsys)
    assert "interrupted scan" in err and "--resume" in err and "--overwrite" in err
    assert ckpt.read_bytes() == b"an interrupted run's state"  # not deleted
    assert main(["scan", "toy", "--data", str(corpus), *ARGS, "--out", str(out), "--overwrite"]) == 0
    assert (out / "state.pt").is_file()


def test_scan_refuses_to_replace_a_finished_scan_and_merge_its_own_part(corpus, tmp_path, capsys):
    parts = [tmp_path / "s0", tmp_path / "s1"]
    for k, d in enumerate(parts):
        assert main(["scan", "toy", "--data", str(corpus), *ARGS, "--shard", f"{k}/2", "--out", str(d)]) == 0
    before = (parts[0] / "state.pt").read_bytes()
    assert main(["scan", "toy", "--data", str(corpus), *ARGS, "--shard", "0/2", "--out", str(parts[0])]) == 2
    assert "finished scan" in _err(capsys)
    # merging into one of the parts would replace that shard's result: refused, even with --overwrite
    for extra in ([], ["--overwrite"]):
        assert main(["merge", str(parts[0]), str(parts[1]), "--no-figures", "--out", str(parts[0]), *extra]) == 2
        assert "one of the scans being merged" in _err(capsys)
    assert (parts[0] / "state.pt").read_bytes() == before
    merged = tmp_path / "m"
    assert main(["merge", str(parts[0]), str(parts[1]), "--no-figures", "--out", str(merged)]) == 0
    assert main(["merge", str(parts[0]), str(parts[1]), "--no-figures", "--out", str(merged)]) == 2
    assert "holds a scan already" in _err(capsys)
    assert main(["merge", str(parts[0]), str(parts[1]), "--no-figures", "--out", str(merged), "--overwrite"]) == 0


@pytest.mark.parametrize("extra,needle", [
    (["--device", "mps"], "MPS is not available"),
    (["--device", "cdua"], "unknown device 'cdua'"),
    (["--layers", "-1"], "no negative indices"),
    (["--seq-len", "-4"], "must be an integer >= 2"),
    (["--out", "/proc/no/such"], "--out"),
    (["--resume", "--overwrite", "--out", "{tmp}/r"], "give one of them"),
])
def test_scan_bad_device_and_indices_one_line(corpus, tmp_path, capsys, extra, needle):
    argv = ["scan", "toy", "--data", str(corpus)] + [a.format(tmp=tmp_path) for a in extra]
    assert main(argv) == 2
    assert needle in _err(capsys)
    assert not list(tmp_path.iterdir())


def test_scan_out_checked_before_the_work(corpus, tmp_path, capsys, monkeypatch):
    """An --out that cannot be written is refused before the model is loaded or a batch runs."""
    import bayesmanifold.commands.scan as cmd

    monkeypatch.setattr(cmd, "open_target", lambda *a, **k: pytest.fail("the model was loaded before --out was checked"))
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert main(["scan", "toy", "--data", str(corpus), "--out", str(blocker / "sub")]) == 2
    assert "is a file" in _err(capsys)
    (tmp_path / "done").mkdir()
    (tmp_path / "done" / "state.pt").write_bytes(b"x")
    assert main(["scan", "toy", "--data", str(corpus), "--out", str(tmp_path / "done")]) == 2
    assert "finished scan" in _err(capsys)
