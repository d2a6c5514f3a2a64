"""The command line's error contract: a bad invocation prints ONE line on stderr and exits 2,
never a traceback; an interrupt exits 130 with one line. Output paths are checked before any work."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from bayesmanifold import cli
from bayesmanifold.cli import main


def _one_line_error(capsys, argv, *, code=2, contains=()):
    """Run ``argv`` through main(); stderr must be one line, the exit code ``code``."""
    assert main(argv) == code, argv
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.endswith("\n"), repr(err)
    assert "Traceback" not in err
    for text in contains:
        assert text in err, (text, err)
    return err


@pytest.fixture
def files(tmp_path):
    d = tmp_path / "adir"
    d.mkdir()
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    afile = tmp_path / "afile.txt"
    afile.write_text("some text\n")
    return {"dir": str(d), "empty": str(empty), "file": str(afile), "tmp": tmp_path}


def test_json_naming_a_directory(capsys, files):
    for argv in (["verify"], ["checkpoints"], ["calibrate", "bijection-v20"]):
        _one_line_error(capsys, [*argv, "--json", files["dir"]], contains=("--json", "is a directory"))


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs /proc (Linux)")
def test_json_in_an_unwritable_directory(capsys):
    _one_line_error(capsys, ["verify", "--json", "/proc/bayesmanifold.json"], contains=("--json", "cannot write"))


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root writes into read-only directories")
def test_json_in_a_read_only_directory(capsys, tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        _one_line_error(capsys, ["checkpoints", "--json", str(ro / "x.json")], contains=("cannot write",))
    finally:
        ro.chmod(0o700)


def test_unknown_device(capsys):
    _one_line_error(capsys, ["verify", "--device", "tpu"], contains=("--device", "unknown device 'tpu'"))


def test_negative_seed(capsys):
    _one_line_error(capsys, ["verify", "--seed", "-1"], contains=("--seed", "0..4294967295"))


def test_empty_text_file(capsys, files):
    _one_line_error(capsys, ["verify", "--text", files["empty"]], contains=("--text", "is empty"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present")
def test_demo_on_cuda_without_a_gpu(capsys, files):
    _one_line_error(capsys, ["demo", "--device", "cuda", "--quick", "--out", str(files["tmp"] / "r")],
                    contains=("no CUDA GPU",))
    assert not (files["tmp"] / "r").exists()


def test_train_out_naming_a_file(capsys, files):
    _one_line_error(capsys, ["train", "bijection", "--steps", "1", "--out", files["file"]], contains=("--out", "is a file"))


def test_model_naming_a_file(capsys, files):
    err = _one_line_error(capsys, ["verify", "--model", files["file"]], contains=("is a file",))
    assert "does not exist" not in err


def test_unknown_hub_name_is_short(capsys):
    err = _one_line_error(capsys, ["verify", "--model", "no-such-model-xyz"], contains=("no-such-model-xyz",))
    assert len(err) <= 450


def test_hf_directory_that_cannot_be_loaded(capsys, tmp_path):
    no_arch = tmp_path / "no_arch"
    no_arch.mkdir()
    (no_arch / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_embd": 32, "n_layer": 1, "n_head": 2, "vocab_size": 64}))
    _one_line_error(capsys, ["verify", "--model", str(no_arch)], contains=("cannot convert",))
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    cfg = {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "n_embd": 32, "n_layer": 1, "n_head": 2,
           "vocab_size": 64, "n_positions": 32}
    (corrupt / "config.json").write_text(json.dumps(cfg))
    (corrupt / "model.safetensors").write_bytes(b"not a safetensors file" * 4)
    _one_line_error(capsys, ["verify", "--model", str(corrupt)], contains=("could not load the weights",))
    bad_json = tmp_path / "bad_json"
    bad_json.mkdir()
    (bad_json / "config.json").write_text("{ not json")
    _one_line_error(capsys, ["verify", "--model", str(bad_json)], contains=("config",))


def test_interrupt_during_start_up(capsys, monkeypatch):
    def interrupted(name):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli.importlib, "import_module", interrupted)
    _one_line_error(capsys, ["verify"], code=130, contains=("interrupted",))


def test_usage_errors_are_one_line(capsys):
    _one_line_error(capsys, ["verify", "--bogus"], contains=("unrecognized arguments", "--help"))
    _one_line_error(capsys, ["no-such-command"], contains=("invalid choice",))
    assert main(["--help"]) == 0
    assert "verify" in capsys.readouterr().out


def test_subprocess_exit_code_and_stderr(tmp_path):
    out = subprocess.run([sys.executable, "-m", "bayesmanifold", "verify", "--device", "tpu"],
                         capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert out.returncode == 2
    assert out.stderr.count("\n") == 1 and "unknown device" in out.stderr and "Traceback" not in out.stderr
    assert out.stdout == ""


@pytest.mark.skipif(sys.platform == "win32", reason="SIGINT")
def test_subprocess_interrupt_is_one_line(tmp_path):
    # the default SIGINT disposition: a suite started in the background (`cmd &`) ignores SIGINT,
    # the child would inherit that, and Python then installs no KeyboardInterrupt handler
    proc = subprocess.Popen([sys.executable, "-m", "bayesmanifold", "verify", "--seq-len", "64"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    maps = Path(f"/proc/{proc.pid}/maps")
    deadline = time.monotonic() + 120
    # interrupt once torch is being loaded (inside main(): the command modules import it), or after 1 s
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if "libtorch" in maps.read_text():
                break
        except OSError:
            if not maps.parent.exists():
                time.sleep(1.0)
                break
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=300)
    if proc.returncode == 0:
        pytest.skip("verify finished before the interrupt arrived")
    assert proc.returncode == 130, err
    assert err.count("\n") == 1 and "interrupted" in err and "Traceback" not in err


# --------------------------------------------------------------------------- property-style
def _bad_invocations(f):
    d, empty, afile, tmp = f["dir"], f["empty"], f["file"], f["tmp"]
    return [
        [],  # placeholder removed below: no command prints help (exit 0)
        ["no-such-command"],
        ["verify", "--bogus"],
        ["verify", "--json", d],
        ["verify", "--json", str(Path(afile) / "x.json")],
        ["verify", "--device", "tpu"],
        ["verify", "--device", "cuda:x"],
        ["verify", "--seed", "-1"],
        ["verify", "--seed", "abc"],
        ["verify", "--seed", str(2**32)],
        ["verify", "--text", empty],
        ["verify", "--text", d],
        ["verify", "--text", str(tmp / "missing.txt")],
        ["verify", "--batch-size", "0"],
        ["verify", "--seq-len", "1"],
        ["verify", "--seq-len", "100000"],
        ["verify", "--model", afile],
        ["verify", "--model", str(tmp / "missing-dir")],
        ["verify", "--model", d],  # a directory without config.json
        ["verify", "--dtype", "float8"],
        ["checkpoints", "--json", d],
        ["calibrate", "bijection-v20", "--json", d],
        ["calibrate", "bijection-v20", "--n-seqs", "0"],
        ["calibrate", str(tmp / "no-checkpoint")],
        ["calibrate", "bijection-v20", "--k", "30"],  # --k is for HMM checkpoints
        ["train", "bijection", "--out", afile],
        ["train", "bijection", "--out", str(tmp / "o"), "--steps", "0"],
        ["train", "bijection", "--out", str(tmp / "o"), "--lr", "-1"],
        ["train", "bijection", "--out", str(tmp / "o"), "--param", "V"],
        ["analyze", "toy", "--n-seqs", "2"],
        ["analyze", "toy", "--out", afile],
        ["analyze", "toy", "--prompts", empty],
        ["analyze", "no-such-checkpoint-or-model"],
        ["report", "toy", "--out", afile],
        ["report", "toy", "--task", "nosuchtask"],
        ["demo", "--out", str(Path(afile) / "r")],
        ["demo", "--checkpoint", "no-such-checkpoint", "--out", str(tmp / "r")],
        ["reproduce", "em-vs-sgd", "--stickiness", "1.5"],
        ["reproduce", "em-vs-sgd", "--seeds", "0"],
        ["reproduce", "em-vs-sgd", "--out", afile],
    ][1:]


def test_no_bad_invocation_prints_a_traceback(capsys, files, monkeypatch):
    monkeypatch.chdir(files["tmp"])
    failures = []
    for argv in _bad_invocations(files):
        try:
            code = main(argv)
        except BaseException as exc:  # noqa: BLE001 - any escape is a failure of the contract
            failures.append((argv, f"raised {type(exc).__name__}: {exc}"))
            continue
        err = capsys.readouterr().err
        if code != 2 or err.count("\n") != 1 or "Traceback" in err:
            failures.append((argv, code, err[-300:]))
    assert not failures, "\n".join(map(str, failures))
    assert sorted(p.name for p in files["tmp"].iterdir()) == ["adir", "afile.txt", "empty.txt"]  # no work was done


def test_library_warnings_print_one_line(capsys, monkeypatch):
    """A warning from the library is one line on stderr, named by the command (not Python's file,
    line and source line), and Python's warning printer is restored afterwards."""
    import argparse
    import warnings

    def build():
        p = argparse.ArgumentParser(prog="bayesmanifold")
        sub = p.add_subparsers(dest="command")

        def run(args):
            warnings.simplefilter("always")
            warnings.warn("the PCA is rank-limited:\n  50 samples for 192 features", UserWarning, stacklevel=1)
            return 0

        sub.add_parser("warns").set_defaults(_run=run)
        return p

    monkeypatch.setattr(cli, "build_parser", build)
    before = warnings.showwarning
    assert main(["warns"]) == 0
    assert capsys.readouterr().err == "bayesmanifold warns: warning: the PCA is rank-limited: 50 samples for 192 features\n"
    assert warnings.showwarning is before
