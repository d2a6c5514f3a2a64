"""Attention entropy closed forms and merge, query–key alignment, head ablation, scoped hooks."""

import math

import numpy as np
import pytest
import torch
from helpers import hook_count, make_model

from bayesmanifold.analyses.ablation import head_ablation
from bayesmanifold.analyses.attention import (
    AttentionEntropyAccumulator,
    attention_entropy,
    query_key_alignment,
)
from bayesmanifold.analyses.keys import key_orthogonality
from bayesmanifold.analyses.stats import entropy
from bayesmanifold.errors import InputError


def test_entropy_uniform_is_log_n():
    for n in (1, 3, 17):
        assert float(entropy(torch.full((n,), 1.0 / n, dtype=torch.float64))) == pytest.approx(math.log(n), abs=1e-12)
    assert float(entropy(torch.tensor([1.0, 0.0, 0.0]))) == 0.0



def test_attention_entropy_mean_after_entropy_and_merge(gen):
    # head 0 one-hot (H=0), head 1 uniform over 4 keys (H=ln 4): mean of entropies = ln4/2,
    # while the entropy of the averaged pattern would be larger.
    pat = torch.zeros(1, 2, 1, 4)
    pat[0, 0, 0, 0] = 1.0
    pat[0, 1, 0] = 0.25
    acc = AttentionEntropyAccumulator([0], 2)
    acc.add(0, pat, torch.ones(1, 1, dtype=torch.bool))
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


def test_results_to_dict_dataframe_plot_and_batch_inputs(gen):
    import json

    import matplotlib

    matplotlib.use("Agg")
    from bayesmanifold.hooks import Batch, position_mask

    model = make_model(dtype=torch.float64, n_key_value_heads=2)
    toks = torch.randint(0, 50, (3, 10), generator=gen)
    mask = torch.ones(3, 10, dtype=torch.long)
    mask[2, 7:] = 0
    pos = position_mask("last", 3, 10, mask)
    # a Batch value is the same measurement as the (tokens, attention_mask, positions) tuple
    ent_b = attention_entropy(model, [Batch(tokens=toks, attention_mask=mask, positions=pos)])
    ent_t = attention_entropy(model, [(toks, mask, pos)])
    np.testing.assert_array_equal(ent_b.per_head, ent_t.per_head)
    qk_b = query_key_alignment(model, [Batch(tokens=toks, attention_mask=mask)], positions="all")
    qk_t = query_key_alignment(model, [(toks, mask)], positions="all")
    np.testing.assert_array_equal(qk_b.cos_other, qk_t.cos_other)
    ko = key_orthogonality(model, token_ids=range(6))
    abl = head_ablation(model, toks, layers=1, heads=[0, 3])
    for res, n_rows in ((ent_b, 8), (qk_b, 8), (ko, 4), (abl, 2)):
        json.dumps(res.to_dict())
        assert len(res.to_dataframe()) == n_rows
        assert res.plot() is not None
    assert abl.to_dict()["heads"] == [0, 3] and ko.to_dict()["absolute"] is False
