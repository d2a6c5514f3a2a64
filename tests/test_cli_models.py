"""One way to open a model: every command takes each kind of model (a shipped checkpoint by name,
'toy', a HuggingFace directory with and without tokenizer files, a .gguf file) in float32 and
float64, or refuses it before any work with one true line."""

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

from bayesmanifold.cli import main

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gguf_fixtures import write_tiny_gguf  # noqa: E402


@pytest.fixture(scope="module")
def bare_llama_dir(hf_llama_dir, tmp_path_factory):
    """The tiny Llama as a training run leaves it: config and weights, no tokenizer files."""
    d = tmp_path_factory.mktemp("bare") / "trained"
    d.mkdir()
    for f in hf_llama_dir.iterdir():
        if f.name in ("config.json", "model.safetensors", "generation_config.json"):
            shutil.copy(f, d / f.name)
    return d


@pytest.fixture(scope="module")
def gguf_file(hf_llama_dir, tmp_path_factory):
    return write_tiny_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf", hf_llama_dir)


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("BAYESMANIFOLD_CACHE", str(tmp_path / "cache"))


def _verify(model, tmp_path, *extra):
    out = tmp_path / "v.json"
    rc = main(["verify", "--model", str(model), "--seq-len", "12", "--batch-size", "2", "--json", str(out), *extra])
    return rc, (json.loads(out.read_text()) if out.exists() else None)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_verify_takes_a_shipped_checkpoint_by_name(dtype, tmp_path):
    rc, d = _verify("bijection-v20", tmp_path, "--dtype", dtype)
    assert rc == 0 and d["dtype"] == dtype
    assert d["max_rel_residual_dscores"] < (1e-4 if dtype == "float32" else 1e-10)  # it really ran in float64


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_verify_takes_a_gguf_file(gguf_file, dtype, tmp_path):
    rc, d = _verify(gguf_file, tmp_path, "--dtype", dtype)
    assert rc == 0 and d["n_heads"] == 4 and d["dtype"] == dtype


def test_a_directory_without_tokenizer(bare_llama_dir, hf_llama_dir, tmp_path, capsys):
    rc, d = _verify(bare_llama_dir, tmp_path)
    if rc == 2:  # TransformerLens 3.x's bridge cannot go without a tokenizer; the message says what to do
        assert "--tokenizer DIR" in capsys.readouterr().err
        return
    assert rc == 0 and d["n_layers"] == 2
    text = tmp_path / "t.txt"
    text.write_text("the quick brown fox jumps over the lazy dog " * 4)
    capsys.readouterr()
    rc, _ = _verify(bare_llama_dir, tmp_path, "--text", str(text))
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.count("\n") == 0 and "no tokenizer" in err and "--tokenizer DIR" in err
    rc, _ = _verify(bare_llama_dir, tmp_path, "--text", str(text), "--tokenizer", str(hf_llama_dir))
    assert rc == 0


def test_scan_takes_a_shipped_checkpoint(tmp_path, capsys):
    ids = np.random.default_rng(0).integers(0, 20, size=4 * 38).astype(np.int64)
    data = tmp_path / "ids.npy"
    np.save(data, ids)
    out = tmp_path / "s.json"
    assert main(["scan", "bijection-v20", "--data", str(data), "--seq-len", "38", "--batch-size", "2",
                 "--json", str(out), "--no-figures"]) == 0
    assert json.loads(out.read_text())["n_tokens"] == 4 * 38


def test_map_takes_a_checkpoint_and_a_gguf_file(gguf_file, tmp_path):
    assert main(["map", str(gguf_file), "--prompt", "the cat sat on the mat", "--out", str(tmp_path / "m.html")]) == 0
    assert (tmp_path / "m.html").stat().st_size > 0


def test_analyze_honours_dtype_on_a_checkpoint(tmp_path):
    out = tmp_path / "a.json"
    assert main(["analyze", "bijection-v20", "--dtype", "float64", "--n-seqs", "8", "--no-dynamics",
                 "--json", str(out)]) == 0
    assert json.loads(out.read_text())["model"]["dtype"] == "float64"


def test_analyze_an_hf_llama_directory(hf_llama_dir, tmp_path):
    out = tmp_path / "a.json"
    assert main(["analyze", str(hf_llama_dir), "--n-seqs", "8", "--no-dynamics", "--json", str(out)]) == 0
    assert json.loads(out.read_text())["model"]["n_key_value_heads"] == 2


@pytest.mark.parametrize("argv, message", [
    (["verify", "--model", "{tmp}/x.gguf"], "does not exist"),
    (["verify", "--model", "{tmp}/notes.txt"], "not a .gguf file"),
    (["verify", "--model", "{tmp}/junk.gguf"], "not a GGUF file"),
    (["verify", "--model", "toy", "--tokenizer", "{tmp}"], "holds no tokenizer files"),
    (["analyze", "bijection-v20", "--task", "hmm", "--n-seqs", "8"], "brings its own task"),
    (["verify", "--model", "toy", "--dtype", "float16"], "float16"),
])
def test_bad_models_one_line(argv, message, tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("hello")
    (tmp_path / "junk.gguf").write_bytes(b"not gguf")
    rc = main([a.format(tmp=tmp_path) for a in argv])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.count("\n") == 0 and message in err, err
    assert not (tmp_path / "cache").exists()  # refused before any work: nothing converted


def test_prepare_converts_a_gguf_file_once_and_later_opens_read_the_cache(gguf_file, tmp_path, capsys, monkeypatch):
    assert main(["prepare", str(gguf_file)]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"{gguf_file}: ") and "layers x" in out and "key/value heads" in out
    cached = [d for d in (tmp_path / "cache" / "gguf").iterdir() if (d / "config.json").is_file()]
    assert len(cached) == 1
    # a cached conversion is read without parsing the GGUF file again
    import bayesmanifold.backends.loading as loading

    def no_parse(path):
        raise AssertionError("the GGUF header was parsed again although the conversion is cached")

    monkeypatch.setattr(loading, "_gguf_fields", no_parse)
    assert main(["prepare", str(gguf_file)]) == 0
    assert [d for d in (tmp_path / "cache" / "gguf").iterdir()] == cached
