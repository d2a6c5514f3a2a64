"""The verify command: JSON fields, precision, one-line errors."""

import json

from bayesmanifold.cli import main


def test_verify_json_float64(tmp_path, capsys):
    out = tmp_path / "out.json"
    assert main(["verify", "--model", "toy", "--dtype", "float64", "--seq-len", "24", "--json", str(out)]) == 0
    d = json.loads(out.read_text())
    for key in ("max_abs_residual_dscores", "max_rel_residual_dscores", "max_abs_residual_dvalues",
                "max_abs_rowsum_dscores", "n_layers", "n_heads", "heads"):
        assert key in d
    assert d["max_rel_residual_dscores"] <= 1e-10
    assert len(d["heads"]) == d["n_layers"] * d["n_heads"]
    assert "layer" in capsys.readouterr().out


def test_verify_hf_directory(hf_llama_dir, tmp_path):
    out = tmp_path / "o.json"
    assert main(["verify", "--model", str(hf_llama_dir), "--dtype", "float64", "--seq-len", "16", "--json", str(out)]) == 0
    d = json.loads(out.read_text())
    # on a TransformerLens 4 bridge HF's Llama attention takes the softmax in float32: verify says so
    assert d["max_rel_residual_dscores"] <= (1e-6 if d["floor"] else 1e-10)
    assert ("float32" in d["floor"]) == (d["backend"] == "TransformerBridge")


def test_verify_text_file(tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("the quick brown fox jumps over the lazy dog " * 10)
    assert main(["verify", "--text", str(text), "--batch-size", "2", "--seq-len", "32"]) == 0


def test_verify_errors_are_one_line(tmp_path, capsys):
    assert main(["verify", "--model", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "does not exist" in err
    assert main(["verify", "--seq-len", "100000"]) == 2
    assert "n_ctx" in capsys.readouterr().err
    assert main(["verify", "--dtype", "float16"]) == 2
