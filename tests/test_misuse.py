"""Issue 27, item 7: library misuse raises a BayesManifoldError naming what was wrong; the command
line's smaller messages (task parameters, corpus files, text files) and output text."""

import numpy as np
import pytest
import torch
from helpers import make_model

from bayesmanifold.analyses import paper3_protocol, verify_routing_law
from bayesmanifold.cli import main
from bayesmanifold.errors import InputError, ModelError, ObjectiveError
from bayesmanifold.experiments.em_vs_sgd.result import p_value_text, plural
from bayesmanifold.report.build import shorten


def test_meta_device_model_is_refused_before_any_hook():
    model = make_model(torch.float32).to("meta")
    with pytest.raises(ModelError, match="meta device"):
        verify_routing_law(model, torch.tensor([[1, 2, 3]]))


def test_one_token_input_names_the_objective(gen):
    with pytest.raises(ObjectiveError, match="at least 2 positions.*1 position"):
        verify_routing_law(make_model(torch.float32), torch.tensor([[3]]))


def test_a_prompt_string_is_not_taken_for_a_missing_file():
    model = make_model(torch.float32)
    with pytest.raises(InputError, match="names no file.*list of at least 3 prompt strings"):
        paper3_protocol(model, "The cat sat on the mat")


def _err(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "Traceback" not in err
    return err


def test_task_parameter_errors_list_the_accepted_keys(tmp_path, capsys):
    assert main(["train", "hmm", "--param", "Q=3", "--steps", "1", "--out", str(tmp_path / "t")]) == 2
    err = _err(capsys)
    assert "unknown parameter Q for task 'hmm'; accepted: S, O, K" in err and "__init__" not in err


def test_corpus_npy_that_is_text_says_so(tmp_path, capsys):
    f = tmp_path / "ids.npy"
    f.write_text("hello world\n")
    assert main(["scan", "toy", "--data", str(f)]) == 2
    err = _err(capsys)
    assert "not a .npy file" in err and "allow_pickle" not in err
    g = tmp_path / "obj.npy"
    np.save(g, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    assert main(["scan", "toy", "--data", str(g)]) == 2
    err = _err(capsys)
    assert "Python objects, not token ids" in err and "allow_pickle" not in err


def test_verify_text_refuses_a_binary_file_as_scan_does(tmp_path, capsys):
    f = tmp_path / "bin.dat"
    f.write_bytes(bytes(range(256)) * 8)
    assert main(["verify", "--text", str(f), "--seq-len", "8", "--batch-size", "1"]) == 2
    assert "is not UTF-8 text" in _err(capsys)
    assert main(["scan", "toy", "--data", str(f)]) == 2
    assert "is not UTF-8 text" in _err(capsys)


def test_output_text():
    assert plural(1, "seed") == "1 seed" and plural(2, "seed") == "2 seeds"
    assert "nan" not in p_value_text(float("nan"), 1) and "1 seed:" in p_value_text(float("nan"), 1)
    assert p_value_text(0.01234, 3) == "paired t-test p = 0.0123"
    cut = shorten("The model's predictive entropy matches the exact Bayesian posterior", 60)
    assert cut.endswith("Bayesian…") and len(cut) <= 60
