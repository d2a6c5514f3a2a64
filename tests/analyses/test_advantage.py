"""Advantage statistics against a slow loop, the histogram and its quantiles, merging."""

import math

import numpy as np
import pytest
import torch
from helpers import make_model, run_over_several_tiles

from bayesmanifold.analyses import AdvantageStats, RoutingLawCheck, verify_routing_law
from bayesmanifold.errors import InputError
from bayesmanifold.hooks import capture


def _slow_advantage_stats(model, tokens, layer, head):
    """Loop oracle: per query, b from autograd-independent recomputation u·v, A = b̄ − b."""
    keep = []
    with capture(model, keep=True) as cap:
        cap.run(tokens)
        keep = cap.kept[layer]
    h = keep.heads.index(head)
    advs, mass_pos, top1 = [], [], []
    for bi in range(tokens.shape[0]):
        for q in range(tokens.shape[1]):
            keys = list(range(q + 1))
            alpha = keep.pattern[bi, h, q, keys]
            u = keep.grad_z[bi, q, h]
            b = torch.stack([u @ keep.values[bi, k, h] for k in keys])
            a = (alpha * b).sum() - b
            advs += a.tolist()
            mass_pos.append(float(alpha[a > 0].sum()))
            g = (alpha * (b - (alpha * b).sum())).abs()
            if g.sum() > 0:  # a single-key row has no routing gradient at all
                top1.append(float(g.max() / g.sum()))
    n = len(advs)
    mean = sum(advs) / n
    return {
        "mean_adv": mean,
        "std_adv": math.sqrt(sum((x - mean) ** 2 for x in advs) / n),
        "frac_positive": sum(x > 0 for x in advs) / n,
        "mass_positive": sum(mass_pos) / len(mass_pos),
        "routing_top1_share": sum(top1) / len(top1),
        "n_entries": n,
        "advs": advs,
    }


def test_advantage_stats_match_slow_loop(gen):
    model = make_model(dtype=torch.float64, n_key_value_heads=2)
    tokens = torch.randint(0, 50, (2, 7), generator=gen)
    _, adv = verify_routing_law(model, tokens)
    df = adv.to_dataframe().set_index(["layer", "head"])
    for layer, head in [(0, 1), (1, 3)]:
        ref = _slow_advantage_stats(model, tokens, layer, head)
        row = df.loc[(layer, head)]
        for k, v in ref.items():
            if k == "advs":
                continue
            assert row[k] == pytest.approx(v, rel=1e-9, abs=1e-12), k
    assert df["alpha_weighted_adv"].abs().max() < 1e-12  # Σ_j α_ij A_ij = 0 by construction
    assert (df["routing_top1_share"] <= 1).all() and (df["routing_effective_keys"] >= 1).all()


def test_histogram_bins_and_quantiles(gen):
    from bayesmanifold.analyses.advantage import _NEG_FIRST, HIST_BIN_VALUES, _float_histogram

    vals = torch.tensor([1.0, 1.2, 1.3, -3.0, 1e-20, -2e8, 0.0, 7.0], dtype=torch.float64)
    h = _float_histogram(torch.cat([vals, torch.zeros(3, dtype=vals.dtype)]).view(1, 1, 1, -1), 3)
    h = h[0].numpy()[_NEG_FIRST]
    fin = np.isfinite(HIST_BIN_VALUES)
    assert h.sum() == 8 and np.all(np.diff(HIST_BIN_VALUES[fin]) > 0) and fin.sum() == 2048 - 2 * 4
    assert np.all(HIST_BIN_VALUES[:4] == -np.inf) and np.all(HIST_BIN_VALUES[-4:] == np.inf)
    centres = HIST_BIN_VALUES[np.repeat(np.arange(h.size), h)]
    for x, c in zip(sorted(vals.tolist()), centres):  # each value sits in the bin of its centre
        assert (x == 0 and abs(c) < 1e-38) or (x * c > 0 and 0.8 < abs(c / x) < 1.25), (x, c)
    assert centres[4] == centres[5] != centres[6]  # 1.0 and 1.2 share [1, 1.25); 1.3 does not
    assert centres[2] != centres[3]  # 0 and 1e-20 are told apart


def test_quantiles_from_histogram_match_exact(gen):
    model = make_model(dtype=torch.float64)
    tokens = torch.randint(0, 50, (2, 9), generator=gen)
    _, res = verify_routing_law(model, tokens)
    exact = sorted(_slow_advantage_stats(model, tokens, 1, 2)["advs"])
    n = len(exact)
    assert res.histograms[(1, 2)].sum() == n
    for q in (0.0, 0.1, 0.5, 0.9, 1.0):
        x = exact[max(1, math.ceil(q * n)) - 1]  # the rank-ceil(q·n) entry
        got = res.quantile(1, 2, q)
        assert x * got > 0 and 0.8 < got / x < 1.25 or (abs(x) < 1e-30 and abs(got) < 1e-30), (q, x, got)
    with pytest.raises(InputError):
        res.quantile(1, 2, 1.5)

    model = make_model(dtype=torch.float64)
    batches = [torch.randint(0, 50, (2, 9), generator=gen) for _ in range(3)]
    one_check, one_adv = RoutingLawCheck(), AdvantageStats()
    with capture(model, accumulators=[one_check, one_adv]) as cap:
        for b in batches:
            cap.run(b)
    parts = []
    for b in batches:
        c, a = RoutingLawCheck(), AdvantageStats()
        with capture(model, accumulators=[c, a]) as cap:
            cap.run(b)
        parts.append((c, a))
    check, adv = parts[0]
    for c, a in parts[1:]:
        check.merge(c)
        adv.merge(a)
    d1, d2 = one_adv.finalize().to_dataframe(), adv.finalize().to_dataframe()
    assert (d1 - d2).abs().max().max() < 1e-12
    r1, r2 = one_check.finalize().to_dataframe(), check.finalize().to_dataframe()
    assert r1.equals(r2)
    h1, h2 = one_adv.finalize().histograms, adv.finalize().histograms
    assert all((h1[k] == h2[k]).all() for k in h1)
    res = one_adv.finalize()
    assert res.quantile(0, 0, 0.0) <= res.quantile(0, 0, 0.5) <= res.quantile(0, 0, 1.0)


def test_undefined_figures_are_nan_and_to_dict_is_json(gen):
    """No routing gradient (an objective that ignores the model): concentration is NaN, not 0."""
    import json

    model = make_model(dtype=torch.float64)
    tokens = torch.randint(0, 50, (2, 8), generator=gen)
    _, adv = verify_routing_law(model, tokens, objective=lambda logits, _t: (logits * 0).sum())
    df = adv.to_dataframe()
    assert (df["n_routing_queries"] == 0).all()
    assert df["routing_top1_share"].isna().all() and df["routing_effective_keys"].isna().all()
    assert (df["frac_positive"] == 0).all()  # A = 0 everywhere: defined, and not positive
    _, adv = verify_routing_law(model, tokens)
    d = json.loads(json.dumps(adv.to_dict()))
    assert len(d["heads"]) == 8 and d["n_bins"] == 2048
    h = d["histograms"][0]
    assert sum(h["counts"]) == adv.histograms[(h["layer"], h["head"])].sum() == d["heads"][0]["n_entries"]


def _loop_stats_from_bundle(keep, head):
    """Every figure of AdvantageStats by a loop over valid (query, key) entries of one head, with
    b = u·v recomputed (independent of autograd's ∂L/∂α) and validity read from the mask."""
    h = keep.heads.index(head)
    advs, mass, argpos, aa, aabs, top1, eff = [], [], [], [], [], [], []
    for bi in range(keep.pattern.shape[0]):
        for q in range(keep.pattern.shape[2]):
            if not keep.query_valid[bi, q]:
                continue
            keys = [k for k in range(keep.pattern.shape[3]) if keep.valid[bi, q, k]]
            alpha = keep.pattern[bi, h, q, keys]
            b = torch.stack([keep.grad_z[bi, q, h] @ keep.values[bi, k, h] for k in keys])
            a = (alpha * b).sum() - b
            advs += a.tolist()
            mass.append(float(alpha[a > 0].sum()))
            argpos.append(bool((a[alpha == alpha.max()] > 0).any()))
            aa.append(float((alpha * a).sum()))
            aabs.append(float((alpha * a.abs()).sum()))
            g = (alpha * a).abs()
            if g.sum() > 0:
                p = g / g.sum()
                top1.append(float(p.max()))
                eff.append(math.exp(-float((p[p > 0] * p[p > 0].log()).sum())))
    n = len(advs)
    mean = sum(advs) / n
    mean_q = lambda xs: sum(xs) / len(xs)  # noqa: E731
    return {
        "n_entries": n, "n_queries": len(mass), "mean_adv": mean,
        "std_adv": math.sqrt(sum((x - mean) ** 2 for x in advs) / n), "min_adv": min(advs), "max_adv": max(advs),
        "frac_positive": sum(x > 0 for x in advs) / n, "mass_positive": mean_q(mass),
        "argmax_positive": mean_q(argpos), "alpha_weighted_adv": mean_q(aa),
        "mean_abs_alpha_weighted_adv": mean_q([abs(x) for x in aa]), "alpha_weighted_abs_adv": mean_q(aabs),
        "n_routing_queries": len(top1), "routing_top1_share": mean_q(top1), "routing_effective_keys": mean_q(eff),
    }


@pytest.mark.parametrize("padded", [False, True])
def test_every_figure_matches_a_loop_over_several_tiles(gen, padded):
    """33 positions make three query blocks (each reaching past its diagonal block only to its last
    visible key), left padding makes invalid rows and keys: every column of the result against the loop."""
    adv = AdvantageStats()
    kept = run_over_several_tiles(gen, adv, padded)
    df = adv.finalize().to_dataframe().set_index(["layer", "head"])
    for layer, head in [(0, 0), (1, 3)]:
        ref = _loop_stats_from_bundle(kept[layer], head)
        row = df.loc[(layer, head)]
        for k, v in ref.items():
            assert row[k] == pytest.approx(v, rel=1e-9, abs=1e-12), k
        assert adv.finalize().histograms[(layer, head)].sum() == ref["n_entries"]


def test_derived_masks_are_shared_and_follow_the_bundle(gen):
    """Masks and tiles are derived once per bundle for every accumulator, and derived again for a
    bundle whose masks change or for a sliced copy."""
    from bayesmanifold.analyses.headstats import entry_mask, layer_tiles, zeroer

    model = make_model(dtype=torch.float64)
    tokens = torch.randint(0, 50, (2, 9), generator=gen)
    with capture(model, keep=True) as cap:
        cap.run(tokens)
        b = cap.kept[0]
    assert layer_tiles(b) is layer_tiles(b) and zeroer(b) is zeroer(b)
    full = entry_mask(b)
    assert full.sum() == 2 * 9 * 10 // 2  # causal: 45 entries per sequence
    b.valid = b.valid.clone()
    b.valid[:, :, 0] = False  # no query may see key 0 any more
    assert entry_mask(b) is not full and entry_mask(b).sum() == full.sum() - 2 * 9
    assert zeroer(b).n_masked(slice(0, 9), slice(0, 9)) == 2 * (81 - 45 + 9)
    part = b.sliced(slice(0, 4))
    assert entry_mask(part).shape[2] == 4
