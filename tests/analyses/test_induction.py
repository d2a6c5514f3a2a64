"""Induction scores and where the routing force points, against run_with_cache."""

import numpy as np
import pytest
import torch
from helpers import make_model, needs_hooked_scores_cache

from bayesmanifold.analyses import induction_scores
from bayesmanifold.analyses.induction import induction_targets, repeated_random_tokens
from bayesmanifold.errors import InputError


def test_targets():
    toks, tgt = repeated_random_tokens(2, 5, low=3, high=9, generator=torch.Generator().manual_seed(0))
    assert toks.shape == (2, 10) and torch.equal(toks[:, :5], toks[:, 5:])
    assert tgt[0].tolist() == [-1] * 5 + [1, 2, 3, 4, 5]
    t = induction_targets(torch.tensor([[1, 2, 3, 1, 2, 4, 1, 2]]), min_match=2)
    assert t[0].tolist() == [-1, -1, -1, -1, 2, -1, -1, 5]
    assert induction_targets(torch.tensor([1, 2, 1, 1]), min_match=1)[0].tolist() == [-1, -1, 1, 3]
    spaces = induction_targets(torch.tensor([5, 0, 0, 0, 0, 0, 7, 0, 0, 0]), min_match=3)[0].tolist()
    assert spaces == [-1] * 9 + [6]  # never the query itself or an overlapping copy
    with pytest.raises(InputError):
        repeated_random_tokens(1, 1, high=5, generator=torch.Generator())


@needs_hooked_scores_cache
def test_scores_and_force_against_run_with_cache(gen):
    model = make_model(torch.float64, seed=4)
    toks, tgt = repeated_random_tokens(3, 8, high=50, generator=gen)
    res = induction_scores(model, tokens=toks, targets=tgt, gradients=True, batch_size=2)
    _, cache = model.run_with_cache(toks, incl_bwd=True, return_type="loss",
                                    names_filter=lambda n: n.endswith(("hook_pattern", "hook_attn_scores")))
    b, q = torch.nonzero(tgt >= 0, as_tuple=True)
    k = tgt[b, q]
    for idx, (layer, head) in enumerate(res.heads):
        a = cache[f"blocks.{layer}.attn.hook_pattern"][:, head]
        assert res.score[idx] == pytest.approx(float(a[b, q, k].mean()), abs=1e-12)
        assert res.prev_token[idx] == pytest.approx(float(torch.diagonal(a, -1, -2, -1).mean()), abs=1e-12)
        assert 0 <= res.force_share_target[idx] <= 1
    # with one batch the force is exactly −∂L/∂s of run_with_cache
    one = induction_scores(model, tokens=toks, targets=tgt, gradients=True, batch_size=3)
    for idx, (layer, head) in enumerate(one.heads):
        f = -cache[f"blocks.{layer}.attn.hook_attn_scores_grad"][:, head].masked_fill(torch.ones(16, 16).triu(1).bool(), 0)
        rows = f[b, q]
        ft = rows[torch.arange(len(b)), k]
        assert one.mean_force_target[idx] == pytest.approx(float(ft.mean()), abs=1e-12)
        assert one.force_share_target[idx] == pytest.approx(float(ft.clamp(min=0).sum() / rows.clamp(min=0).sum()), rel=1e-10)
        assert one.frac_force_positive[idx] == pytest.approx(float((ft > 0).double().mean()), abs=1e-12)


def test_default_probe_and_result_forms():
    from bayesmanifold.backends import toy_model

    res = induction_scores(toy_model(), n_seqs=4)
    assert res.n_queries == 4 * 64 and np.isnan(res.force_share_target).all()
    assert res.grid().shape == (2, 4) and len(res.to_dataframe()) == 8
    assert res.to_dict()["heads"][0]["layer"] == 0
    with pytest.raises(InputError, match="after its query"):
        induction_scores(toy_model(), tokens=torch.zeros(1, 4, dtype=torch.long), targets=torch.tensor([[3, -1, -1, -1]]))
