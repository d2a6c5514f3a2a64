"""Key orthogonality oracles, attention entropy closed forms, QK alignment, head ablation."""

import math

import numpy as np
import pytest
import torch
from helpers import hook_count, make_model

from bayesmanifold.analyses.geometry import (
    AttentionEntropyAccumulator,
    attention_entropy,
    fresh_model,
    head_ablation,
    key_orthogonality,
    mean_offdiag_cosine,
    pattern_entropy,
    query_key_alignment,
)
from bayesmanifold.errors import InputError


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


def test_column_orthogonality_of_orthonormal_WK_is_zero_and_gqa_shape():
    model = make_model(dtype=torch.float64, n_key_value_heads=2)
    with torch.no_grad():
        for layer in range(2):
            W = model.blocks[layer].attn._W_K
            for h in range(W.shape[0]):
                q, _ = torch.linalg.qr(torch.randn(32, 8, dtype=torch.float64))
                W[h] = q
    res = key_orthogonality(model, definition="columns", random_init_baseline=True, seed=3)
    assert res.per_head.shape == (2, 2)
    np.testing.assert_allclose(res.per_head, 0.0, atol=1e-12)
    assert 0.05 < res.gaussian < 0.3  # E|cos| of 32-dim Gaussians ~ sqrt(2/(pi*32)) = 0.14
    assert (res.random_init > 0.01).all()
    assert len(res.to_dataframe()) == 4


def test_fresh_model_is_seeded_and_leaves_global_rng_alone():
    model = make_model(dtype=torch.float32)
    state = torch.random.get_rng_state()
    a, b = fresh_model(model, seed=1), fresh_model(model, seed=1)
    assert torch.equal(torch.random.get_rng_state(), state)
    torch.testing.assert_close(a.blocks[0].attn.W_K, b.blocks[0].attn.W_K)
    assert not torch.allclose(a.blocks[0].attn.W_K, model.blocks[0].attn.W_K.float())


def test_pattern_entropy_uniform_is_log_n():
    for n in (1, 3, 17):
        assert float(pattern_entropy(torch.full((n,), 1.0 / n, dtype=torch.float64))) == pytest.approx(math.log(n), abs=1e-12)
    assert float(pattern_entropy(torch.tensor([1.0, 0.0, 0.0]))) == 0.0


def test_attention_entropy_mean_after_entropy_and_merge(gen):
    # head 0 one-hot (H=0), head 1 uniform over 4 keys (H=ln 4): mean of entropies = ln4/2,
    # while the entropy of the averaged pattern would be larger.
    pat = torch.zeros(1, 2, 1, 4)
    pat[0, 0, 0, 0] = 1.0
    pat[0, 1, 0] = 0.25
    acc = AttentionEntropyAccumulator([0], 2)
    acc.update(0, pat, torch.ones(1, 1, dtype=torch.bool))
    res = acc.finalize()
    assert res.per_layer[0] == pytest.approx(math.log(4) / 2)
    model = make_model(dtype=torch.float64)
    toks = torch.randint(0, 50, (4, 12), generator=gen)
    one = attention_entropy(model, toks, positions="all")
    a = attention_entropy(model, toks[:2], positions="all")
    b = attention_entropy(model, toks[2:], positions="all")
    # merged = one-pass: rebuild via accumulators
    acc1 = AttentionEntropyAccumulator(a.layers, 4)
    acc1.sums, acc1.counts = a.per_head * a.n_queries, np.full(2, a.n_queries, float)
    acc2 = AttentionEntropyAccumulator(b.layers, 4)
    acc2.sums, acc2.counts = b.per_head * b.n_queries, np.full(2, b.n_queries, float)
    np.testing.assert_allclose(acc1.merge(acc2).finalize().per_head, one.per_head, rtol=1e-12)
    assert one.reduction == pytest.approx((one.per_layer[0] - one.per_layer[1]) / one.per_layer[0])


def test_attention_entropy_first_query_is_zero_and_uniform_scores(gen):
    model = make_model(dtype=torch.float64)
    with torch.no_grad():
        for b in model.blocks:
            b.attn.W_Q.zero_()
            b.attn.b_Q.zero_()
    toks = torch.randint(0, 50, (2, 9), generator=gen)
    res = attention_entropy(model, toks, positions=[0, 8])
    # query 0 sees one key (H = 0), query 8 sees 9 keys uniformly (H = ln 9)
    np.testing.assert_allclose(res.per_head, math.log(9) / 2, rtol=1e-9)


def test_qk_alignment_and_head_ablation_leave_no_hooks(gen):
    model = make_model(dtype=torch.float64, n_key_value_heads=2, positional_embedding_type="rotary", rotary_dim=8)
    toks = torch.randint(0, 50, (2, 10), generator=gen)
    n0 = hook_count(model)
    qk = query_key_alignment(model, toks, positions="all")
    assert qk.cos_top.shape == (2, 4) and np.all(np.abs(qk.cos_top) <= 1 + 1e-9)
    abl = head_ablation(model, toks, mode="zero")
    # manual: zero head 2 of layer 1
    def hook(z, hook):
        z = z.clone()
        z[:, :, 2] = 0
        return z
    with torch.no_grad():
        base = float(model(toks, return_type="loss"))
        with model.hooks(fwd_hooks=[("blocks.1.attn.hook_z", hook)]):
            ab = float(model(toks, return_type="loss"))
    assert abl.delta[1, 2] == pytest.approx(ab - base, abs=1e-10)
    assert abl.baseline == pytest.approx(base, abs=1e-10)
    assert hook_count(model) == n0
    with pytest.raises(InputError):
        key_orthogonality(model, definition="tokens")


def test_user_hooks_survive_our_scoped_hooks(gen):
    model = make_model(dtype=torch.float32)
    seen = []
    model.add_hook("blocks.0.attn.hook_pattern", lambda t, hook: seen.append(1))
    model.hook_dict["blocks.0.attn.hook_pattern"].ctx["mine"] = 1
    toks = torch.randint(0, 50, (1, 6), generator=gen)
    attention_entropy(model, toks)
    head_ablation(model, toks, layers=0, heads=0)
    assert model.hook_dict["blocks.0.attn.hook_pattern"].ctx == {"mine": 1}
    seen.clear()
    model(toks)
    assert seen == [1]
    model.reset_hooks()
