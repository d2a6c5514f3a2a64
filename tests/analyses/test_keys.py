"""Key orthogonality: closed-form oracles, a manual computation, GQA shapes, seeded baselines."""

import numpy as np
import pytest
import torch
from helpers import make_model, needs_hooked

from bayesmanifold.analyses.keys import key_orthogonality, mean_offdiag_cosine
from bayesmanifold.backends import model_access


def test_offdiag_cosine_orthonormal_and_identical(gen):
    q, _ = torch.linalg.qr(torch.randn(10, 10, generator=gen, dtype=torch.float64))
    assert float(mean_offdiag_cosine(q[:6])) == pytest.approx(0.0, abs=1e-12)
    same = torch.randn(1, 5, generator=gen).expand(4, 5)
    assert float(mean_offdiag_cosine(same)) == pytest.approx(1.0, abs=1e-6)
    # |cos| vs signed: v and -v
    v = torch.randn(1, 5, generator=gen)
    pair = torch.cat([v, -v])
    assert float(mean_offdiag_cosine(pair)) == pytest.approx(-1.0, abs=1e-6)
    assert float(mean_offdiag_cosine(pair, absolute=True)) == pytest.approx(1.0, abs=1e-6)



def test_token_key_orthogonality_matches_manual_computation():
    model = make_model(dtype=torch.float64)
    res = key_orthogonality(model, token_ids=range(12), layers=[0, 1], random_init_baseline=False)
    for layer in (0, 1):
        x = model.blocks[layer].ln1(model.W_E[:12][None])[0]
        for h in range(4):
            k = x @ model.blocks[layer].attn.W_K[h] + model.blocks[layer].attn.b_K[h]
            kn = k / k.norm(dim=-1, keepdim=True)
            c = kn @ kn.T
            expect = ((c.sum() - c.diagonal().sum()) / (12 * 11)).detach()
            assert res.per_head[layer, h] == pytest.approx(float(expect), abs=1e-10)



@needs_hooked
def test_column_orthogonality_of_orthonormal_WK_is_zero_and_gqa_shape(gen):
    model = make_model(dtype=torch.float64, n_key_value_heads=2)
    with torch.no_grad():
        for layer in range(2):
            W = model.blocks[layer].attn._W_K
            for h in range(W.shape[0]):
                q, _ = torch.linalg.qr(torch.randn(32, 8, generator=gen, dtype=torch.float64))
                W[h] = q
    res = key_orthogonality(model, definition="columns", random_init_baseline=True, seed=3)
    assert res.per_head.shape == (2, 2)
    np.testing.assert_allclose(res.per_head, 0.0, atol=1e-12)
    assert 0.05 < res.gaussian < 0.3  # E|cos| of 32-dim Gaussians ~ sqrt(2/(pi*32)) = 0.14
    assert (res.random_init > 0.01).all()
    assert len(res.to_dataframe()) == 4



def test_fresh_like_is_seeded_and_leaves_global_rng_alone():
    model = make_model(dtype=torch.float32)
    state = torch.random.get_rng_state()
    a, b = model_access(model).fresh_copy(seed=1), model_access(model).fresh_copy(seed=1)
    assert torch.equal(torch.random.get_rng_state(), state)
    torch.testing.assert_close(a.blocks[0].attn.W_K, b.blocks[0].attn.W_K)
    assert not torch.allclose(a.blocks[0].attn.W_K, model.blocks[0].attn.W_K.float())
