"""The routing-law check: residuals, the verdict per head, and the traps it must not fall into.

Oracles: a corrupted gradient must fail; a head whose gradient path is cut, an objective with no
gradient and an attention sink must never read as a residual of 0 that "holds".
"""

import json
import math

import pytest
import torch
from helpers import hook_count, make_model, run_over_several_tiles

from bayesmanifold.analyses import RoutingLawCheck, verify_routing_law
from bayesmanifold.analyses.routing_law import law_tolerance
from bayesmanifold.errors import InputError
from bayesmanifold.hooks import Batch, capture
from bayesmanifold.hooks.interventions import ablated_head


def test_law_result_fields_and_gqa_subset(gen):
    model = make_model(dtype=torch.float64, n_key_value_heads=2)
    tokens = torch.randint(0, 50, (2, 9), generator=gen)
    law, _ = verify_routing_law(model, tokens, heads=[0, 1, 2])
    rows = {(r["layer"], r["head"]): r for r in law.rows}
    assert rows[(0, 0)]["value_law_checked"] and not rows[(0, 2)]["value_law_checked"]
    assert math.isnan(rows[(0, 2)]["max_abs_residual_dvalues"])
    assert law.max_rel_residual_dscores < 1e-12 and law.max_abs_residual_dvalues < 1e-12
    assert law.holds and rows[(0, 2)]["holds"]  # an unchecked value law does not fail the head
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
    res = c.finalize()
    assert res.max_rel_residual_dscores > 1e-3
    assert not res.holds and all("∂L/∂s differs from α(b − b̄)" in r["reason"] for r in res.rows)


def test_plots_and_empty_finalize(gen):
    import matplotlib

    matplotlib.use("Agg")
    model = make_model()
    law, adv = verify_routing_law(model, torch.randint(0, 50, (1, 8), generator=gen))
    assert law.plot() is not None and adv.plot() is not None
    with pytest.raises(InputError):
        RoutingLawCheck().finalize()


def test_healthy_model_holds_with_the_dtype_tolerance(gen):
    tokens = torch.randint(0, 50, (2, 9), generator=gen)
    for dtype in (torch.float64, torch.float32):
        law, _ = verify_routing_law(make_model(dtype=dtype), tokens, advantage_stats=False)
        assert law.holds and law.reason == "" and law.n_tested == 8
        assert all(r["holds"] and r["tested"] and r["reason"] == "" for r in law.rows)
        assert all(r["tolerance"] == law_tolerance(dtype) for r in law.rows)
    assert law_tolerance(torch.float64) < 1e-10 and 1e-5 < law_tolerance(torch.float32) < 1e-4
    law, _ = verify_routing_law(make_model(), tokens, advantage_stats=False, tolerance=1e-3)
    assert law.rows[0]["tolerance"] == 1e-3
    with pytest.raises(InputError):
        RoutingLawCheck(tolerance=2.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_peaked_attention_is_no_false_alarm(gen, dtype):
    """Near one-hot attention: ∂L/∂s is tiny while the rounding of Σ_j ∂L/∂s_ij is not; still holds."""
    model = make_model(dtype=dtype)
    with torch.no_grad():
        for blk in model.blocks:
            blk.attn.W_Q.mul_(300)
            blk.attn.W_K.mul_(300)
    law, _ = verify_routing_law(model, torch.randint(0, 50, (2, 32), generator=gen), advantage_stats=False)
    assert law.holds, law.reason


def test_zero_objective_is_not_a_pass(gen):
    """(logits*0).sum(): no gradient anywhere; nothing is tested, so the result does not hold."""
    model = make_model(dtype=torch.float64)
    law, _ = verify_routing_law(model, torch.randint(0, 50, (2, 8), generator=gen),
                                objective=lambda logits, _t: (logits * 0).sum(), advantage_stats=False)
    assert not law.holds and law.n_tested == 0 and "nothing was tested" in law.reason
    assert math.isnan(law.max_rel_residual_dscores)  # not 0: there was nothing to compare
    for r in law.rows:
        assert not r["tested"] and math.isnan(r["rel_residual_dscores"]) and "no gradient flows" in r["reason"]


def _zero_head_z(head):
    def hook(z, hook):
        z = z.clone()
        z[:, :, head] = 0.0
        return z

    return hook


@pytest.mark.parametrize("how", ["tl_hook_before", "ablated_before", "ablated_inside"])
def test_head_whose_output_is_replaced_is_not_a_pass(gen, how):
    """A user intervention zeroes head 1's z. Seen by capture (registered before it), autograd's
    ∂L/∂s is exactly 0 while α(b − b̄) is not: the head does not hold (the old relative residual
    divided by max|autograd| = 0 and reported 0). Registered after capture's hooks, no gradient
    reaches the head at all: it is reported as not tested."""
    model = make_model(dtype=torch.float64)
    tokens = torch.randint(0, 50, (2, 8), generator=gen)
    n0 = hook_count(model)
    check = RoutingLawCheck()
    if how == "tl_hook_before":
        with model.hooks(fwd_hooks=[("blocks.0.attn.hook_z", _zero_head_z(1))]):
            with capture(model, accumulators=[check]) as cap:
                cap.run(tokens)
    elif how == "ablated_before":
        with ablated_head(model, 0, 1):
            with capture(model, accumulators=[check]) as cap:
                cap.run(tokens)
    else:
        with capture(model, accumulators=[check]) as cap:
            with ablated_head(model, 0, 1):
                cap.run(tokens)
    assert hook_count(model) == n0
    law = check.finalize()
    rows = {(r["layer"], r["head"]): r for r in law.rows}
    cut = rows[(0, 1)]
    assert all(r["holds"] and r["tested"] for k, r in rows.items() if k != (0, 1))
    if how == "ablated_inside":
        assert cut["holds"] and not cut["tested"] and "no gradient flows" in cut["reason"]
        assert math.isnan(cut["rel_residual_dscores"]) and "L0H1" in law.reason
        assert law.holds  # every tested head holds; the untested one is named in the reason
    else:
        assert not cut["holds"] and cut["tested"] and not law.holds
        assert cut["max_abs_dscores"] == 0 and cut["max_abs_residual_dscores"] > 0
        assert cut["rel_residual_dscores"] == 1.0 and cut["rel_residual_dvalues"] == 1.0
        assert "∂L/∂s is exactly 0 but the law predicts" in cut["reason"] and "L0H1" in law.reason
        assert law.max_rel_residual_dscores == 1.0


def test_attention_sink_is_reported(gen):
    """A learned extra key joins the softmax: every entry's law holds, the row sums do not."""
    try:
        model = make_model(dtype=torch.float64, use_attention_sinks=True)
    except TypeError:
        pytest.skip("this TransformerLens has no use_attention_sinks")
    law, _ = verify_routing_law(model, torch.randint(0, 50, (2, 8), generator=gen), advantage_stats=False)
    assert law.max_rel_residual_dscores < 1e-12
    assert not law.holds
    for r in law.rows:
        assert not r["holds"] and r["max_pattern_row_deficit"] > 0.1
        assert "row sums of ∂L/∂s are not 0" in r["reason"] and "attention sink" in r["reason"]


def test_batch_or_tokens_one_or_many(gen):
    model = make_model(dtype=torch.float64)
    t1, t2 = (torch.randint(0, 50, (2, 8), generator=gen) for _ in range(2))
    a, _ = verify_routing_law(model, t1, advantage_stats=False)
    b, _ = verify_routing_law(model, Batch(tokens=t1), advantage_stats=False)
    assert a.to_dataframe().equals(b.to_dataframe())
    many, _ = verify_routing_law(model, [Batch(tokens=t1), t2], advantage_stats=False)
    assert all(r["n_batches"] == 2 for r in many.rows) and many.holds
    with pytest.raises(InputError):
        verify_routing_law(model, [], advantage_stats=False)
    d = json.loads(json.dumps(many.to_dict()))
    assert d["holds"] is True and d["n_tested"] == 8 and len(d["heads"]) == 8
    assert many.summary() == many.to_dict()


@pytest.mark.parametrize("padded", [False, True])
def test_every_residual_matches_the_full_tensors_over_several_tiles(gen, padded):
    """33 positions make three query blocks whose tiles stop at their last visible key, and left
    padding makes invalid rows and keys. Autograd's gradients are perturbed (∂L/∂α everywhere,
    masked entries included; ∂L/∂s at valid entries; ∂L/∂v) so that every residual is a number
    to compare, not rounding: every accumulated figure against the whole tensors."""

    class Perturbed(RoutingLawCheck):
        def update(self, b):
            g = torch.Generator().manual_seed(b.layer)
            noise = lambda t: 1e-3 * torch.randn(t.shape, generator=g, dtype=t.dtype)  # noqa: E731
            m = (b.valid & b.query_valid[:, :, None])[:, None]
            b.grad_pattern = b.grad_pattern + noise(b.grad_pattern)
            b.grad_scores = b.grad_scores + noise(b.grad_scores) * m
            b.grad_values = b.grad_values + noise(b.grad_values)
            super().update(b)

    check = Perturbed()
    kept = run_over_several_tiles(gen, check, padded)  # kept after the update: the perturbed gradients
    verdicts = {(r["layer"], r["head"]): r for r in check.finalize().rows}
    rows = {(layer, h): s for layer, h, s in check.stats.rows()}  # every accumulated figure
    for layer, b in kept.items():
        m = b.valid & b.query_valid[:, :, None]  # [batch, query, key]
        for h in b.heads:
            a, gs, gp = b.pattern[:, h], b.grad_scores[:, h], b.grad_pattern[:, h]
            u, v = b.grad_z[:, :, h], b.values[:, :, h]
            compat = u @ v.transpose(-1, -2)
            bbar = (a * compat).sum(-1, keepdim=True)
            ref = {
                "max_abs_residual_dpattern": (gp - compat).abs()[m].max(),
                "max_abs_dpattern": gp.abs()[m].max(),
                "max_abs_residual_dscores": (a * (compat - bbar) - gs).abs().max(),
                "max_abs_dscores": gs.abs().max(),
                "max_abs_rowsum_dscores": gs.sum(-1).abs().max(),
                "max_row_scale": (a * compat).abs().sum(-1).max(),
                "max_abs_residual_dvalues": (a.transpose(-1, -2) @ u - b.grad_values[:, :, h]).abs().max(),
                "max_abs_dvalues": b.grad_values[:, :, h].abs().max(),
            }
            row = rows[(layer, h)]
            for k, want in ref.items():
                assert row[k] == pytest.approx(float(want), rel=1e-9), (layer, h, k)
            assert row["max_pattern_row_deficit"] == pytest.approx(float((a.sum(-1) - 1).abs()[b.query_valid].max()), abs=1e-15)
            assert row["max_abs_residual_dscores"] > 1e-5 and not verdicts[(layer, h)]["holds"]
