"""Responsibility sums, specialization oracles, group labels from the batch, errors."""

import json

import numpy as np
import pytest
import torch
from helpers import hook_count, make_model

from bayesmanifold.analyses.value_specialization import SpecializationAccumulator, specialization
from bayesmanifold.errors import InputError
from bayesmanifold.hooks import Batch, LayerBundle, capture


def _bundle(pattern, groups, layer=0, heads=None, **batch_kw):
    """A LayerBundle of a hand-made pattern whose batch carries the group labels."""
    b, h, q, k = pattern.shape
    batch = Batch(tokens=torch.zeros(b, q, dtype=torch.long), labels={"group": groups}, **batch_kw)
    valid = torch.ones(q, k, dtype=torch.bool).tril().expand(b, q, k)
    return LayerBundle(
        layer=layer, heads=list(range(h)) if heads is None else heads, kv_heads=[0] * h, attn_scale=None,
        pattern=pattern, values=torch.zeros(b, k, h, 1), grad_z=None, grad_pattern=None, grad_scores=None,
        grad_values=None, valid=valid, query_valid=valid.any(-1), n_heads=h, n_kv_heads=1, batch=batch,
    )


def test_responsibility_sums_to_query_rows(gen):
    model = make_model(dtype=torch.float64)
    toks = torch.randint(0, 50, (3, 12), generator=gen)
    n0 = hook_count(model)
    res = specialization(model, (toks, torch.arange(12) % 3), n_groups=3)
    np.testing.assert_allclose(res.responsibility_total, 3 * 12, rtol=1e-10)
    assert res.n_query_rows == 36
    np.testing.assert_allclose(res.responsibility_mean, 1.0, rtol=1e-10)  # 36 / 36 values
    assert ((res.specialist_share >= 0) & (res.specialist_share <= 1)).all()
    assert hook_count(model) == n0
    d = json.loads(json.dumps(res.to_dict()))
    assert d["n_query_rows"] == 36 and np.asarray(d["specialist_share"]).shape == (2, 4)
    assert len(res.to_dataframe()) == 8


def test_specialist_and_generalist_oracle():
    # 4 queries, groups [0, 0, 1, 1]; key 0 attended only by group 0, key 1 equally by both.
    pat = torch.zeros(1, 1, 4, 3, dtype=torch.float64)
    pat[0, 0, 0, 0] = 1.0
    pat[0, 0, 1, 0] = 1.0
    pat[0, 0, 2, 1] = 1.0
    pat[0, 0, 3, 1] = 0.5
    pat[0, 0, 3, 2] = 0.5
    acc = SpecializationAccumulator([0], 1, 2, min_responsibility=0.1)
    acc.update(_bundle(pat, torch.tensor([[0, 0, 1, 1]])))
    res = acc.finalize()
    # key 0: entropy 0 (specialist); key 1: mass (0, 1.5) -> specialist; key 2: (0, 0.5) -> specialist
    assert res.specialist_share[0, 0] == pytest.approx(1.0)
    pat2 = torch.zeros(1, 1, 2, 1, dtype=torch.float64)
    pat2[0, 0, :, 0] = 1.0
    acc2 = SpecializationAccumulator([0], 1, 2)
    acc2.update(_bundle(pat2, torch.tensor([[0, 1]])))
    r2 = acc2.finalize()
    assert r2.normalized_entropy[0, 0] == pytest.approx(1.0)
    assert r2.generalist_share[0, 0] == pytest.approx(1.0)


def test_per_sequence_labels_and_scored_positions():
    # one group per sequence: every value of a sequence is a pure specialist
    pat = torch.full((2, 1, 3, 3), 1 / 3, dtype=torch.float64)
    acc = SpecializationAccumulator([0], 1, 2)
    acc.update(_bundle(pat, torch.tensor([0, 1])))
    assert acc.finalize().specialist_share[0, 0] == pytest.approx(1.0)
    # batch.positions leaves queries out: only query 0 (group 0) counts, so key 0 is a specialist
    pos = torch.tensor([[True, False, False]])
    acc = SpecializationAccumulator([0], 1, 2)
    acc.update(_bundle(pat[:1], torch.tensor([[0, 1, 1]]), positions=pos))
    assert acc.finalize().normalized_entropy[0, 0] == pytest.approx(0.0)


def test_accumulator_in_a_capture_equals_the_wrapper_and_respects_heads(gen):
    model = make_model(dtype=torch.float64)
    toks = torch.randint(0, 50, (2, 10), generator=gen)
    groups = toks % 3
    ref = specialization(model, (toks, groups), n_groups=3)
    acc = SpecializationAccumulator([0, 1], 4, 3)
    with capture(model, accumulators=[acc]) as cap:
        cap.run(Batch(tokens=toks, labels={"group": groups}))
    np.testing.assert_array_equal(acc.finalize().normalized_entropy, ref.normalized_entropy)
    sub = SpecializationAccumulator([1], 4, 3)
    with capture(model, accumulators=[sub], layers=[1], heads=[1, 3]) as cap:
        cap.run(Batch(tokens=toks, labels={"group": groups}))
    r = sub.finalize()
    np.testing.assert_allclose(r.normalized_entropy[0, [1, 3]], ref.normalized_entropy[1, [1, 3]], rtol=1e-12)
    assert np.isnan(r.normalized_entropy[0, [0, 2]]).all()
    via_batch = specialization(model, Batch(tokens=toks, labels={"group": groups}), n_groups=3)
    np.testing.assert_array_equal(via_batch.specialist_share, ref.specialist_share)


def test_specialization_merge_equals_one_pass(gen):
    pats = [torch.randn(2, 3, 6, 6, generator=gen, dtype=torch.float64).softmax(-1) for _ in range(2)]
    groups = [torch.randint(0, 3, (2, 6), generator=gen) for _ in range(2)]
    one = SpecializationAccumulator([0], 3, 3)
    for p, g in zip(pats, groups):
        one.update(_bundle(p, g))
    parts = [SpecializationAccumulator([0], 3, 3) for _ in range(2)]
    for acc, p, g in zip(parts, pats, groups):
        acc.update(_bundle(p, g))
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
    with pytest.raises(InputError, match="no label 'group'"):
        specialization(model, Batch(tokens=toks), n_groups=2)
    with pytest.raises(InputError, match="no batches"):
        specialization(model, [], n_groups=2)


def test_plot():
    import matplotlib

    matplotlib.use("Agg")
    pat = torch.full((1, 2, 3, 3), 1 / 3, dtype=torch.float64)
    acc = SpecializationAccumulator([0], 2, 2)
    acc.update(_bundle(pat, torch.tensor([[0, 1, 1]])))
    assert acc.finalize().plot() is not None
