"""Offline HuggingFace loading (tiny GPT-2 and GQA+rotary Llama saved with save_pretrained)."""

import pytest
import torch
from helpers import HAS_HOOKED, needs_hooked

from bayesmanifold.analyses import verify_routing_law
from bayesmanifold.backends import load_hf_directory, load_model
from bayesmanifold.errors import ModelError


@pytest.mark.parametrize("fixture", ["hf_gpt2_dir", "hf_llama_dir"])
def test_hf_directory_matches_hf_and_satisfies_laws(fixture, request, gen):
    from transformers import AutoModelForCausalLM

    path = request.getfixturevalue(fixture)
    model = load_hf_directory(path, dtype="float64")
    hf = AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.float64)
    tokens = torch.randint(3, 30, (2, 12), generator=gen)
    assert (model(tokens) - hf(tokens).logits).abs().max() < 1e-6
    law, adv = verify_routing_law(model, tokens)
    # A TransformerLens 4 bridge runs HF's Llama attention, which takes the softmax in float32 (the
    # result's floor says so): the routing law then holds to float32 precision.
    floor = bool(law.floor)
    assert floor == (fixture == "hf_llama_dir" and not HAS_HOOKED)
    assert law.max_rel_residual_dscores <= (1e-6 if floor else 1e-10)
    assert law.max_rel_residual_dvalues <= 1e-10
    assert law.max_abs_rowsum_dscores <= (1e-8 if floor else 1e-12)
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


# ---------------------------------------------------------------- directories named like a user's
@pytest.fixture(scope="module")
def user_dirs(tmp_path_factory):
    """Models saved where users save them: a name containing "llama" or "gemma" makes
    TransformerLens's converter take a built-in config by name; a GPT-2 saved by current
    transformers without ``n_ctx`` has only ``n_positions``."""
    from hf_fixtures import save_tiny_gemma, save_tiny_gpt2, save_tiny_llama

    root = tmp_path_factory.mktemp("home") / "models"
    return {
        "Llama-tiny": save_tiny_llama(root / "Llama-tiny"),
        "gemma-test": save_tiny_llama(root / "gemma-test"),
        "gpt2-no-n_ctx": save_tiny_gpt2(root / "gpt2-finetuned", legacy_n_ctx=False),
        "gpt2-under-llama": save_tiny_gpt2(root / "llama-experiments" / "baseline", legacy_n_ctx=False),
        "real-gemma": save_tiny_gemma(root / "my-model"),
    }


def _global_rng():
    import random

    import numpy as np

    return torch.random.get_rng_state().clone(), np.random.get_state()[1].copy(), random.getstate()


def _same_rng(a, b):
    return torch.equal(a[0], b[0]) and (a[1] == b[1]).all() and a[2] == b[2]


@pytest.mark.parametrize("name", ["Llama-tiny", "gemma-test", "gpt2-no-n_ctx", "gpt2-under-llama"])
def test_directory_name_and_current_configs_do_not_matter(name, user_dirs, gen):
    import json

    from transformers import AutoModelForCausalLM

    path = user_dirs[name]
    if name.startswith("gpt2"):
        assert "n_ctx" not in json.loads((path / "config.json").read_text())
    before = _global_rng()
    model = load_hf_directory(path, dtype="float64")
    assert _same_rng(before, _global_rng())  # building and loading leave the global RNGs alone
    hf = AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.float64)
    tokens = torch.randint(3, 30, (2, 12), generator=gen)
    with torch.no_grad():
        assert (model(tokens) - hf(tokens).logits).abs().max() < 1e-6
    arch = "GPT2LMHeadModel" if name.startswith("gpt2") else "LlamaForCausalLM"
    assert model.cfg.original_architecture == arch
    assert model.cfg.n_ctx == 64 and model.cfg.n_layers == 2
    assert model.tokenizer is not None and model.to_tokens("ab").shape[1] >= 2


@needs_hooked
def test_unconvertible_architecture_names_itself(user_dirs):
    # TransformerLens converts Gemma only from its official names, never from a config.json.
    with pytest.raises(ModelError, match="GemmaForCausalLM"):
        load_hf_directory(user_dirs["real-gemma"])


def test_building_leaves_the_global_rng_alone():
    """In a fresh interpreter (TransformerLens 2.x's first import draws from Python's random)."""
    import subprocess
    import sys

    code = (
        "import random, numpy, torch\n"
        "random.seed(5); numpy.random.seed(5); torch.manual_seed(5)\n"
        "state = lambda: (torch.random.get_rng_state().clone(), numpy.random.get_state()[1].copy(), random.getstate())\n"
        "s = state()\n"
        "from bayesmanifold.backends import load_model\n"
        "from bayesmanifold.models import build_model, preset_spec\n"
        "from bayesmanifold.windtunnels import BijectionTask\n"
        "m = load_model('toy')\n"
        "for arch in ('transformer', 'lstm', 'mlp'):\n"
        "    build_model(preset_spec('tiny', BijectionTask(V=4, L=3), arch=arch), seed=3)\n"
        "t = state()\n"
        "assert torch.equal(s[0], t[0]), 'torch'\n"
        "assert (s[1] == t[1]).all(), 'numpy'\n"
        "assert s[2] == t[2], 'python'\n"
        "assert m.cfg.seed is None\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]


def test_toy_model_is_seeded_locally():
    a, b, c = load_model("toy", seed=3), load_model("toy", seed=3), load_model("toy", seed=4)
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k])
    assert not torch.equal(a.W_E, c.W_E)
