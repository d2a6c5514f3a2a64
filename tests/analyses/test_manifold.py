"""Streaming PCA against numpy, participation ratio closed form, merge = one pass, features."""

import numpy as np
import pytest
import torch
from helpers import hook_count, make_model

from bayesmanifold.analyses.features import collect_features, value_manifold
from bayesmanifold.analyses.manifold import ManifoldAccumulator, spectrum_stats
from bayesmanifold.errors import InputError


def _data(gen, n=200, d=6):
    scales = torch.tensor([5.0, 2.0, 1.0, 0.5, 0.3, 0.1])[:d]
    return (torch.randn(n, d, generator=gen, dtype=torch.float64) @ torch.randn(d, d, generator=gen, dtype=torch.float64)) * scales + 3.0


def test_pca_shares_match_numpy_eigendecomposition(gen):
    x = _data(gen)
    for standardize in (False, True):
        acc = ManifoldAccumulator(standardize=standardize)
        acc.update(x)
        res = acc.finalize()
        z = x.numpy()
        if standardize:
            z = (z - z.mean(0)) / z.std(0)
        lam = np.sort(np.linalg.eigvalsh(np.cov(z, rowvar=False)))[::-1]
        np.testing.assert_allclose(res.explained_variance, lam, rtol=1e-8, atol=1e-10)
        assert res.pc1_share == pytest.approx(lam[0] / lam.sum(), rel=1e-9)
        assert res.pc12_share == pytest.approx(lam[:2].sum() / lam.sum(), rel=1e-9)
        cum = np.cumsum(lam) / lam.sum()
        assert res.n_components_90 == int(np.argmax(cum >= 0.9) + 1)
        assert res.n_components_95 == int(np.argmax(cum >= 0.95) + 1)


def test_participation_ratio_closed_form():
    assert spectrum_stats(np.array([1.0, 0, 0, 0]))["participation_ratio"] == pytest.approx(1.0)
    assert spectrum_stats(np.ones(7))["participation_ratio"] == pytest.approx(7.0)
    lam = np.array([3.0, 2.0, 1.0])
    assert spectrum_stats(lam)["participation_ratio"] == pytest.approx(36.0 / 14.0)


def test_streaming_merge_equals_one_pass(gen):
    x = _data(gen, n=300)
    s = torch.rand(300, generator=gen, dtype=torch.float64)
    one = ManifoldAccumulator()
    one.update(x, s)
    parts = [ManifoldAccumulator() for _ in range(3)]
    for i, p in enumerate(parts):
        p.update(x[i * 100 : (i + 1) * 100], s[i * 100 : (i + 1) * 100])
    merged = parts[0].merge(parts[1]).merge(parts[2])
    a, b = one.finalize(), merged.finalize()
    np.testing.assert_allclose(a.explained_variance, b.explained_variance, rtol=1e-9)
    assert a.spearman_pc1 == pytest.approx(b.spearman_pc1, abs=1e-12)
    assert a.participation_ratio == pytest.approx(b.participation_ratio, rel=1e-12)


def test_large_feature_path_uses_sklearn_and_agrees(gen, monkeypatch):
    import bayesmanifold.analyses.manifold as mm

    x = _data(gen, n=80)
    ref = ManifoldAccumulator()
    ref.update(x)
    monkeypatch.setattr(mm, "MAX_COV_FEATURES", 2)
    big = ManifoldAccumulator()
    big.update(x)
    assert big.outer is None
    np.testing.assert_allclose(big.finalize().explained_variance, ref.finalize().explained_variance, rtol=1e-6)


def test_spearman_and_r2_on_a_line(gen):
    t = torch.rand(100, generator=gen, dtype=torch.float64)
    x = torch.stack([t, 2 * t, -t], 1) + 1e-3 * torch.randn(100, 3, generator=gen, dtype=torch.float64)
    acc = ManifoldAccumulator(standardize=False)
    acc.update(x, scalar=torch.exp(t))  # monotone, not linear
    res = acc.finalize()
    assert res.pc1_share > 0.999
    assert abs(res.spearman_pc1) > 0.99
    assert 0.9 < res.r2_pc1 < 1.0


def test_constant_features_are_dropped_and_all_constant_errors(gen):
    x = torch.cat([_data(gen, n=50, d=3), torch.full((50, 2), 4.0, dtype=torch.float64)], 1)
    acc = ManifoldAccumulator(standardize=True)
    acc.update(x)
    res = acc.finalize()
    assert res.n_dropped_constant == 2 and res.n_features == 3
    bad = ManifoldAccumulator(standardize=True)
    bad.update(torch.ones(10, 3))
    with pytest.raises(InputError, match="constant"):
        bad.finalize()


def test_input_errors():
    acc = ManifoldAccumulator(n_components=5)
    acc.update(torch.randn(4, 8))
    with pytest.raises(InputError, match="fewer samples"):
        acc.finalize()
    one = ManifoldAccumulator()
    one.update(torch.randn(1, 3))
    with pytest.raises(InputError, match="at least 2"):
        one.finalize()
    with pytest.raises(InputError, match="scalar has"):
        ManifoldAccumulator().update(torch.randn(5, 3), torch.randn(4))


def test_collect_features_kinds_and_gqa(gen):
    model = make_model(dtype=torch.float32, n_key_value_heads=2)
    toks = torch.randint(0, 50, (3, 10), generator=gen)
    n0 = hook_count(model)
    _, cache = model.run_with_cache(toks)
    v = collect_features(model, toks, kind="values", layer=1, head=3, positions="last")
    torch.testing.assert_close(v, cache["blocks.1.attn.hook_v"][:, -1, 1])  # head 3 -> kv head 3 // 2
    vc = collect_features(model, toks, kind="values_concat", layer=1, positions=[2, 5])
    assert vc.shape == (6, 2 * 8)
    torch.testing.assert_close(vc[1], cache["blocks.1.attn.hook_v"][0, 5].flatten())
    r = collect_features(model, toks, kind="residual", layer=-1, positions="all")
    torch.testing.assert_close(r, cache["blocks.1.hook_resid_post"].flatten(0, 1))
    z = collect_features(model, toks, kind="head_outputs", layer=0, head=1, positions=torch.tensor([0, 4, 9]))
    torch.testing.assert_close(z[2], cache["blocks.0.attn.hook_z"][2, 9, 1])
    assert hook_count(model) == n0
    res = value_manifold(model, [(toks, torch.rand(30, generator=gen))], kind="values_concat", positions="all")
    assert res.n_samples == 30 and "kv heads concatenated" in res.feature_kind
    with pytest.raises(InputError):
        collect_features(model, toks, kind="nope")


def test_fewer_samples_than_features_warns_and_is_recorded(gen):
    import json

    from bayesmanifold.analyses.manifold import RankLimitedWarning

    acc = ManifoldAccumulator(standardize=False)
    acc.update(torch.randn(5, 8, generator=gen, dtype=torch.float64))
    with pytest.warns(RankLimitedWarning, match=r"5 samples in 8 features.*at least 9 samples"):
        res = acc.finalize()
    assert res.rank_limited and res.to_dict()["rank_limited"] is True
    json.dumps(res.to_dict())
    ok = ManifoldAccumulator(standardize=False)
    ok.update(torch.randn(9, 8, generator=gen, dtype=torch.float64))
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", RankLimitedWarning)
        assert not ok.finalize().rank_limited  # 9 = d + 1 samples can span every direction


def test_feature_accumulator_on_batches_with_labels(gen):
    import json

    import matplotlib

    matplotlib.use("Agg")
    from bayesmanifold.analyses.features import FeatureAccumulator
    from bayesmanifold.hooks import Batch, capture

    model = make_model(dtype=torch.float32)
    toks = torch.randint(0, 50, (12, 9), generator=gen)
    pos = torch.zeros(12, 9, dtype=torch.bool)
    pos[:, [2, 5, 8]] = True  # 36 samples: more than the 32 residual features
    per_pos = torch.rand(12, 9, generator=gen, dtype=torch.float64)
    per_seq = torch.rand(12, generator=gen, dtype=torch.float64)
    # per-position label = the tuple form with the scalar at the selected positions
    a = value_manifold(model, [Batch(tokens=toks, positions=pos, labels={"h": per_pos})], kind="residual", label="h")
    b = value_manifold(model, [(toks, per_pos[pos], pos)], kind="residual")
    np.testing.assert_array_equal(a.explained_variance, b.explained_variance)
    np.testing.assert_array_equal(a.scalar, per_pos[pos].numpy())
    assert a.spearman_pc1 == b.spearman_pc1
    # per-sequence label, two batches merged = one batch
    parts = []
    for sl in (slice(0, 5), slice(5, 12)):
        acc = FeatureAccumulator(kind="values", layer=1, head=2, label="s", pca=ManifoldAccumulator())
        with capture(model, accumulators=[acc], layers=1) as cap:
            cap.run(Batch(tokens=toks[sl], positions=pos[sl], labels={"s": per_seq[sl]}))
        parts.append(acc)
    merged = parts[0].merge(parts[1]).finalize()
    one = value_manifold(model, [Batch(tokens=toks, positions=pos, labels={"s": per_seq})], kind="values", layer=1, head=2, label="s")
    np.testing.assert_allclose(merged.explained_variance, one.explained_variance, rtol=1e-10)
    np.testing.assert_array_equal(merged.scalar, per_seq.repeat_interleave(3).numpy())
    json.dumps(one.to_dict())
    assert len(one.to_dataframe()) == len(one.explained_variance) and one.plot() is not None
    with pytest.raises(InputError, match="no label 'x'"):
        value_manifold(model, [Batch(tokens=toks, positions=pos)], kind="residual", label="x")
    with pytest.raises(InputError, match="scalar has 3 entries"):
        value_manifold(model, [(toks, torch.rand(3), pos)], kind="residual")

