"""Responsibility sums, specialization oracles, group errors, value-update alignment, feedback."""

import copy

import numpy as np
import pytest
import torch
from helpers import hook_count, make_model

from bayesmanifold.analyses.manifold import _forward_capture
from bayesmanifold.analyses.responsibility import (
    SpecializationAccumulator,
    _kept_bundles,
    _step_copy,
    _value_param_names,
    positive_feedback_probe,
    specialization,
    value_update_alignment,
)
from bayesmanifold.errors import InputError
from bayesmanifold.hooks import next_token_loss


def test_responsibility_sums_to_query_rows(gen):
    model = make_model(dtype=torch.float64)
    toks = torch.randint(0, 50, (3, 12), generator=gen)
    res = specialization(model, (toks, torch.arange(12) % 3), n_groups=3)
    np.testing.assert_allclose(res.responsibility_total, 3 * 12, rtol=1e-10)
    assert res.n_query_rows == 36
    np.testing.assert_allclose(res.responsibility_mean, 1.0, rtol=1e-10)  # 36 / 36 values
    assert ((res.specialist_share >= 0) & (res.specialist_share <= 1)).all()


def test_specialist_and_generalist_oracle():
    # 4 queries, groups [0, 0, 1, 1]; key 0 attended only by group 0, key 1 equally by both.
    pat = torch.zeros(1, 1, 4, 3, dtype=torch.float64)
    pat[0, 0, 0, 0] = 1.0
    pat[0, 0, 1, 0] = 1.0
    pat[0, 0, 2, 1] = 1.0
    pat[0, 0, 3, 1] = 0.5
    pat[0, 0, 3, 2] = 0.5
    acc = SpecializationAccumulator([0], 1, 2, min_responsibility=0.1)
    acc.update(0, pat, torch.tensor([0, 0, 1, 1]))
    res = acc.finalize()
    # key 0: entropy 0 (specialist); key 1: mass (0, 1.5) -> specialist; key 2: (0, 0.5) -> specialist
    assert res.specialist_share[0, 0] == pytest.approx(1.0)
    pat2 = torch.zeros(1, 1, 2, 1, dtype=torch.float64)
    pat2[0, 0, :, 0] = 1.0
    acc2 = SpecializationAccumulator([0], 1, 2)
    acc2.update(0, pat2, torch.tensor([0, 1]))
    r2 = acc2.finalize()
    assert r2.normalized_entropy[0, 0] == pytest.approx(1.0)
    assert r2.generalist_share[0, 0] == pytest.approx(1.0)


def test_specialization_merge_equals_one_pass(gen):
    pats = [torch.randn(2, 3, 6, 6, generator=gen, dtype=torch.float64).softmax(-1) for _ in range(2)]
    groups = [torch.randint(0, 3, (2, 6), generator=gen) for _ in range(2)]
    one = SpecializationAccumulator([0], 3, 3)
    for p, g in zip(pats, groups):
        one.update(0, p, g)
    parts = [SpecializationAccumulator([0], 3, 3) for _ in range(2)]
    for acc, p, g in zip(parts, pats, groups):
        acc.update(0, p, g)
    a, b = one.finalize(), parts[0].merge(parts[1]).finalize()
    for name in ("normalized_entropy", "weighted_entropy", "specialist_share", "generalist_share", "responsibility_total"):
        np.testing.assert_allclose(getattr(a, name), getattr(b, name), rtol=1e-12)


def test_group_length_mismatch_and_bad_labels(gen):
    model = make_model(dtype=torch.float32)
    toks = torch.randint(0, 50, (2, 10), generator=gen)
    with pytest.raises(InputError, match="query positions"):
        specialization(model, (toks, torch.zeros(9, dtype=torch.long)), n_groups=2)
    with pytest.raises(InputError, match="shape"):
        specialization(model, (toks, torch.zeros(3, 10, dtype=torch.long)), n_groups=2)
    with pytest.raises(InputError, match="labels"):
        specialization(model, (toks, torch.full((10,), 5)), n_groups=2)
    with pytest.raises(InputError, match="integer"):
        specialization(model, (toks, torch.zeros(10)), n_groups=2)


def test_value_step_matches_kernel_of_capture_gradient(gen):
    """Oracle for the pieces value_update_alignment uses: after SGD on W_V/b_V only, layer 0's
    observed Δv equals −η (X Xᵀ + 1) ∂L/∂v, with X the ln1 output and ∂L/∂v from capture."""
    model = make_model(dtype=torch.float64)
    toks = torch.randint(0, 50, (2, 8), generator=gen)
    obj, lr = next_token_loss(None), 0.05
    kept, _ = _kept_bundles(model, toks, [0], obj, None)
    names = ["blocks.0.attn.hook_v", "blocks.0.ln1.hook_normalized"]
    before, _ = _forward_capture(model, toks, names)
    new = _step_copy(model, toks, obj, None, _value_param_names(model, [0, 1]), lr, None)
    after, _ = _forward_capture(new, toks, names[:1])
    X = before[names[1]].flatten(0, 1)  # (b·k) d
    G = kept[0].grad_values.flatten(0, 1)  # (b·k) kv d
    pred = -lr * torch.einsum("nm,mhd->nhd", X @ X.T + 1, G)
    obs = (after[names[0]] - before[names[0]]).flatten(0, 1)
    torch.testing.assert_close(obs, pred, rtol=1e-8, atol=1e-12)


def test_value_update_alignment_gqa_and_no_side_effects(gen):
    model = make_model(dtype=torch.float64, n_key_value_heads=2)
    ref = copy.deepcopy(model.state_dict())
    n0 = hook_count(model)
    toks = torch.randint(0, 50, (2, 10), generator=gen)
    res = value_update_alignment(model, toks, params="values", lr=0.01)
    assert res.cosine.shape == (2, 2)
    assert np.all(np.abs(res.cosine) <= 1 + 1e-9) and np.all(res.relative_change > 0)
    # a step on the values moves them, on average, along the responsibility-weighted direction
    assert res.cosine[0].mean() > 0
    for k, v in model.state_dict().items():
        assert torch.equal(v, ref[k]), k
    assert hook_count(model) == n0
    assert all(p.grad is None for p in model.parameters())
    assert len(res.to_dataframe()) == 4


def test_positive_feedback_probe_runs_and_is_finite(gen):
    model = make_model(dtype=torch.float64)
    n0 = hook_count(model)
    toks = torch.randint(0, 50, (2, 10), generator=gen)
    res = positive_feedback_probe(model, toks, lr=0.05)
    assert res.db_corr.shape == (2, 4)
    assert np.isfinite(res.db_corr).all() and np.isfinite(res.feedback_corr).all()
    assert ((res.sign_agreement >= 0) & (res.sign_agreement <= 1)).all()
    assert hook_count(model) == n0
