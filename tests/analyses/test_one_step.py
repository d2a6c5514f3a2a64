"""The one-step check: a gradient step on a copy moves attention toward positive advantage."""

import math

import pytest
import torch
from helpers import hook_count, make_model

from bayesmanifold.analyses import one_step_check
from bayesmanifold.errors import ConfigError
from bayesmanifold.hooks import Batch


def test_one_step_moves_attention_toward_positive_advantage(gen):
    """First order: Σ_ij A_ij Δα_ij = <Δs, αA> ≥ 0 for a step on a head's own W_Q, W_K, linear in lr."""
    model = make_model(dtype=torch.float64)
    tokens = torch.randint(0, 50, (4, 16), generator=gen)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    res = one_step_check(model, tokens, lr=1e-4, scope="layer_qk")
    small = one_step_check(model, tokens, lr=1e-5, scope="layer_qk")
    df, df_small = res.to_dataframe(), small.to_dataframe()
    assert (df["adv_weighted_dalpha"] > 0).all()
    ratio = df["adv_weighted_dalpha"] / df_small["adv_weighted_dalpha"]
    assert ((ratio - 10).abs() < 0.1).all()  # the first-order regime: the effect scales with lr
    assert (df["corr_ds_alpha_adv"] > 0).all()
    assert res.loss_after < res.loss_before
    full = one_step_check(model, tokens, lr=1e-3)
    assert full.loss_after < full.loss_before and len(full.rows) == 8
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    with pytest.raises(ConfigError):
        one_step_check(model, tokens, lr=-1)
    with pytest.raises(ConfigError):
        one_step_check(model, tokens, scope="weird")


def test_one_step_takes_a_batch_and_leaves_no_trace(gen):
    model = make_model(dtype=torch.float64)
    tokens = torch.randint(0, 50, (2, 10), generator=gen)
    mask = torch.ones_like(tokens)
    mask[0, :3] = 0  # left padding
    n0, rng = hook_count(model), torch.random.get_rng_state()
    a = one_step_check(model, tokens, lr=1e-4, attention_mask=mask, scope="layer_qk", layers=[1], heads=[0, 2])
    b = one_step_check(model, Batch(tokens=tokens, attention_mask=mask), lr=1e-4, scope="layer_qk", layers=[1], heads=[0, 2])
    assert hook_count(model) == n0 and torch.equal(rng, torch.random.get_rng_state())
    assert [(r["layer"], r["head"]) for r in a.rows] == [(1, 0), (1, 2)]
    assert a.to_dataframe().equals(b.to_dataframe()) and a.loss_after == b.loss_after
    d = a.to_dict()
    assert d["scope"] == "layer_qk" and len(d["heads"]) == 2 and d["loss_after"] < d["loss_before"]


def test_one_step_without_gradient_reports_nan_not_zero(gen):
    """An objective with no gradient: nothing moves, so the correlation and the gained-mass share
    are undefined (NaN; the old code said 0.0, "uncorrelated")."""
    model = make_model(dtype=torch.float64)
    res = one_step_check(model, torch.randint(0, 50, (2, 8), generator=gen), lr=1e-3,
                         objective=lambda logits, _t: (logits * 0).sum())
    df = res.to_dataframe()
    assert df["corr_ds_alpha_adv"].isna().all() and df["gain_share_positive"].isna().all()
    assert (df["adv_weighted_dalpha"] == 0).all() and res.loss_after == res.loss_before == 0
    assert not any(math.isnan(v) for v in df["mean_abs_dalpha"])
    with pytest.raises(ConfigError):
        one_step_check(model, torch.zeros(1, 4, dtype=torch.long), lr=float("inf"))
