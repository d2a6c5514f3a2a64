"""Offline HuggingFace loading (tiny GPT-2 and GQA+rotary Llama saved with save_pretrained)."""

import pytest
import torch

from bayesmanifold.analyses import verify_routing_law
from bayesmanifold.errors import ModelError
from bayesmanifold.hooks import load_hf_directory, load_model


@pytest.mark.parametrize("fixture", ["hf_gpt2_dir", "hf_llama_dir"])
def test_hf_directory_matches_hf_and_satisfies_laws(fixture, request, gen):
    from transformers import AutoModelForCausalLM

    path = request.getfixturevalue(fixture)
    model = load_hf_directory(path, dtype="float64")
    hf = AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.float64)
    tokens = torch.randint(3, 30, (2, 12), generator=gen)
    assert (model(tokens) - hf(tokens).logits).abs().max() < 1e-6
    law, adv = verify_routing_law(model, tokens)
    assert law.max_rel_residual_dscores <= 1e-10
    assert law.max_rel_residual_dvalues <= 1e-10
    assert law.max_abs_rowsum_dscores <= 1e-12
    if fixture == "hf_llama_dir":
        assert model.cfg.n_key_value_heads == 2
    assert model.tokenizer is not None and model.to_tokens("ab").shape[1] >= 2


def test_hf_float32_relative_tolerance(hf_llama_dir, gen):
    model = load_hf_directory(hf_llama_dir, dtype="float32")
    law, _ = verify_routing_law(model, torch.randint(3, 30, (2, 16), generator=gen), advantage_stats=False)
    assert law.max_rel_residual_dscores <= 1e-5


def test_bad_directories(tmp_path):
    with pytest.raises(ModelError, match="does not exist"):
        load_hf_directory(tmp_path / "missing")
    with pytest.raises(ModelError, match="config.json"):
        load_hf_directory(tmp_path)
    (tmp_path / "config.json").write_text('{"architectures": ["NoSuchModelForCausalLM"], "model_type": "nosuch"}')
    with pytest.raises(ModelError):
        load_hf_directory(tmp_path)


def test_half_precision_on_cpu_is_refused():
    with pytest.raises(ModelError, match="float16"):
        load_model("toy", dtype="float16")
    with pytest.raises(ModelError, match="dtype"):
        load_model("toy", dtype="float8")
