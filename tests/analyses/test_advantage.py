"""Routing-law check, advantage statistics (against a slow loop), merging, the one-step check."""

import math

import numpy as np
import pytest
import torch
from helpers import make_model


from bayesmanifold.analyses.routing import (
    AdvantageStats,
    RoutingLawCheck,
    one_step_check,
    verify_routing_law,
)
from bayesmanifold.errors import ConfigError, InputError
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
    from bayesmanifold.analyses.routing import HIST_BIN_VALUES, _float_histogram, _NEG_FIRST

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


def test_law_result_fields_and_gqa_subset(gen):
    model = make_model(dtype=torch.float64, n_key_value_heads=2)
    tokens = torch.randint(0, 50, (2, 9), generator=gen)
    law, _ = verify_routing_law(model, tokens, heads=[0, 1, 2])
    rows = {(r["layer"], r["head"]): r for r in law.rows}
    assert rows[(0, 0)]["value_law_checked"] and not rows[(0, 2)]["value_law_checked"]
    assert math.isnan(rows[(0, 2)]["max_abs_residual_dvalues"])
    assert law.max_rel_residual_dscores < 1e-12 and law.max_abs_residual_dvalues < 1e-12
    s = law.summary()
    for key in ("max_abs_residual_dscores", "max_rel_residual_dscores", "max_abs_residual_dvalues",
                "max_abs_rowsum_dscores", "n_layers", "n_heads", "heads"):
        assert key in s
    assert s["n_layers"] == 2 and len(s["heads"]) == 6


def test_residual_detects_a_wrong_law(gen):
    """The check can fail: perturb the captured gradient and the residual must show it."""

    class Corrupt(RoutingLawCheck):
        def update(self, b):
            b.grad_scores = b.grad_scores * 1.01
            super().update(b)

    model = make_model(dtype=torch.float64)
    c = Corrupt()
    with capture(model, accumulators=[c]) as cap:
        cap.run(torch.randint(0, 50, (1, 8), generator=gen))
    assert c.finalize().max_rel_residual_dscores > 1e-3


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


def test_plots_and_empty_finalize(gen):
    import matplotlib

    matplotlib.use("Agg")
    model = make_model()
    law, adv = verify_routing_law(model, torch.randint(0, 50, (1, 8), generator=gen))
    assert law.plot() is not None and adv.plot() is not None
    with pytest.raises(InputError):
        RoutingLawCheck().finalize()
