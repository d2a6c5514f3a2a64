"""The gradient laws of one attention head, checked against autograd head by head.

Paper II (arXiv 2512.22473, §3; PAPERS.md §1) derives, for one head with α_ij = softmax_j(s_ij),
o_i = Σ_j α_ij v_j and upstream gradient u_i = ∂L/∂o_i, with b_ij = u_i·v_j and b̄_i = Σ_j α_ij b_ij:

    ∂L/∂α_ij = b_ij        ∂L/∂s_ij = α_ij (b_ij − b̄_i)        ∂L/∂v_j = Σ_i α_ij u_i
    Σ_j ∂L/∂s_ij = 0       (routing only redistributes attention)

:class:`RoutingLawCheck` compares autograd's ∂L/∂s, ∂L/∂α and ∂L/∂v with these closed forms,
recomputing b = u·v from the captured u and v (GQA-aware: a shared kv head's gradient sums over
its group), and judges per head whether the laws hold.

How a head is judged is in :mod:`~bayesmanifold.analyses.routing_law_result` (the tolerance model,
also stated in every result's ``tolerance_model``). In short: the routing law and the row sums are
judged per query row against ``tol · Σ_j α_ij |b_ij|``, an absolute bound from the magnitudes the
law's two terms carry (so an attention-sink head, whose law value is far below its terms, is not
failed by their rounding and the verdict does not flip with the batch size); ∂L/∂α and ∂L/∂v by a
relative residual whose scale cannot vanish unless both sides do; ``tol = eps ** (2/3)`` of the
coarser of the tensors' and the softmax's dtype (float64 3.7e-11, float32 2.4e-5). A head with
no gradient is marked untested; a cut gradient path (autograd exactly 0, the law not) fails. A
learned extra key in the softmax (an attention sink outside the captured scores) makes
Σ_j ∂L/∂s_ij = b̄_i (1 − Σ_j α_ij) ≠ 0: such a head does not hold and its reason reports the row
sums of α.
"""

import dataclasses
import warnings
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from .. import kernels
from ..backends.batch import Batch
from ..errors import InputError
from ..hooks.bundle import LayerBundle
from ..hooks.capture import capture
from ..hooks.model_state import describe_active_dropout
from ..hooks.objectives import Objective
from .advantage import AdvantageResult, AdvantageStats
from .headstats import (
    HeadStats,
    RowBuffers,
    Scratch,
    Zeroer,
    _derived,
    entry_mask,
    kernel_choice,
    layer_tiles,
    use_kernels,
    zeroer,
)
from .routing_law_result import TOLERANCE_MODEL, RoutingLawResult, judge_head, law_tolerance

__all__ = ["RoutingLawCheck", "RoutingLawResult", "verify_routing_law", "law_tolerance", "value_updates"]

_CHECK_KINDS = {
    **{f"max_abs_{k}": "max" for k in ("residual_dscores", "dscores", "rowsum_dscores", "residual_dpattern", "dpattern",
                                        "residual_dvalues", "dvalues")},
    "max_row_scale": "max",  # max_i Σ_j α_ij |b_ij|
    "max_pattern_row_deficit": "max",  # max_i |1 − Σ_j α_ij| over real query rows
    "max_excess_dscores": "max",  # max_i (max_j |∂L/∂s_ij − α_ij(b_ij − b̄_i)| − tol Σ_j α_ij|b_ij|): > 0 fails
    "max_excess_rowsum": "max",  # max_i (|Σ_j ∂L/∂s_ij| − tol Σ_j α_ij|b_ij|): > 0 fails
    "max_terms_residual_dscores": "max",  # max_i res_i / (Σ_j α_ij|b_ij| + res_i): shown, 0 where both are 0
    "value_law_checked": "min",
    "n_batches": "sum",
}


def value_updates(b: LayerBundle) -> Tensor:
    """Σ_i α_ij u_i per selected query head, ``[batch, head, d_head, key_pos]`` (Paper II's value law).

    Formed tile by tile over the keys each query block may see (α = 0 elsewhere), once per bundle:
    :class:`RoutingLawCheck` compares its group sums with autograd's ∂L/∂v, and
    ``ValueUpdateNorms`` of a GQA model takes its norms, from the same tensor.
    """
    return _derived(b, "value_updates", lambda: _value_updates(b))


def _value_updates(b: LayerBundle) -> Tensor:
    u_h = b.grad_z.transpose(1, 2).contiguous()  # [batch, head, pos, d]
    law_t = u_h.new_zeros(*b.pattern.shape[:2], u_h.shape[3], b.pattern.shape[3])
    for hs, qs, ks in layer_tiles(b):
        law_t[:, hs, :, ks] += torch.matmul(u_h[:, hs, qs].transpose(-1, -2), b.pattern[:, hs, qs, ks])
    return law_t


def _law_tiles(b: LayerBundle, rows: RowBuffers, u_h: Tensor, v_h: Tensor, zero: Zeroer,
               tile_list: list[tuple[slice, slice, slice]]) -> None:
    """The PyTorch path: the rows of :data:`~bayesmanifold.kernels.LAW_ROWS`, tile by tile."""
    alpha, gs, gp = b.pattern, b.grad_scores, b.grad_pattern
    scratch = Scratch(alpha, tile_list, 2)
    for hs, qs, ks in tile_list:
        a, zm = alpha[:, hs, qs, ks], zero.tile(qs, ks, alpha.dtype)
        g_s, g_p = gs[:, hs, qs, ks], gp[:, hs, qs, ks]
        compat, tmp = scratch.get(0, a.shape), scratch.get(1, a.shape)
        torch.matmul(u_h[:, hs, qs], v_h[:, hs, ks].transpose(-1, -2), out=compat)  # b = u·v, recomputed
        torch.amax(zm(torch.sub(g_p, compat, out=tmp).abs_()), -1, out=rows.at("res_p", hs, qs))
        torch.amax(zm(torch.abs(g_p, out=tmp)), -1, out=rows.at("max_p", hs, qs))
        torch.mul(a, compat, out=tmp)
        bbar = tmp.sum(-1, keepdim=True)
        torch.sum(tmp.abs_(), -1, out=rows.at("row_scale", hs, qs))  # Σ_j α_ij |b_ij|
        # ∂L/∂s and α(b − b̄) are both exactly 0 at masked keys (α = 0): no masking needed
        torch.amax(compat.sub_(bbar).mul_(a).sub_(g_s).abs_(), -1, out=rows.at("res_s", hs, qs))  # |∂L/∂s − α(b − b̄)|
        torch.amax(torch.abs(g_s, out=tmp), -1, out=rows.at("max_s", hs, qs))
        torch.sum(g_s, -1, out=rows.at("rowsum", hs, qs))  # keys past the tile are masked: 0 there
        torch.sum(a, -1, out=rows.at("alpha_sum", hs, qs))


class RoutingLawCheck:
    """Accumulator: residuals of the routing, value and compatibility laws per head, and a verdict.

    Args:
        tolerance: relative tolerance of the judgement (None: :func:`law_tolerance` of the
            coarsest dtype captured).
        kernel: ``"auto"`` (the fused C kernels of :mod:`bayesmanifold.kernels` for the per-entry
            passes where built and applicable: float32 on the CPU) or ``"torch"``.

    Example:
        >>> check = RoutingLawCheck()
        >>> with capture(model, accumulators=[check]) as cap:  # doctest: +SKIP
        ...     cap.run(tokens)
        >>> res = check.finalize()  # doctest: +SKIP
        >>> res.holds, res.max_rel_residual_dscores  # doctest: +SKIP
    """

    def __init__(self, *, tolerance: float | None = None, kernel: str = "auto") -> None:
        self.kernel = kernel_choice(kernel)
        if tolerance is not None and not (isinstance(tolerance, int | float) and 0 < tolerance < 1):
            raise InputError(f"tolerance must be a number in (0, 1) or None (from the dtype), got {tolerance!r}")
        self.tolerance = tolerance
        self.stats = HeadStats(_CHECK_KINDS)
        self.eps = 0.0  # the coarsest machine epsilon among the tensors seen
        self.softmax: dict[float, str] = {}  # eps -> name of a softmax dtype coarser than the tensors

    def update(self, b: LayerBundle) -> None:
        alpha, u, v, gs, gp = b.pattern, b.grad_z, b.values, b.grad_scores, b.grad_pattern
        eps_b = max(torch.finfo(t.dtype).eps for t in (alpha, u, v, gs, gp, b.grad_values))
        self.eps = max(self.eps, eps_b)
        if b.softmax_dtype is not None:
            eps_b = max(eps_b, torch.finfo(b.softmax_dtype).eps)
        tol_b = self.tolerance if self.tolerance is not None else eps_b ** (2 / 3)  # this bundle's precision
        self.softmax.update({torch.finfo(d).eps: str(d)[6:] for d in [b.softmax_dtype] if d is not None})  # HF Llama: float32
        rows = RowBuffers(list(kernels.LAW_ROWS), alpha)
        zero = zeroer(b)
        u_h, v_h = u.transpose(1, 2).contiguous(), v.transpose(1, 2).contiguous()  # [batch, head, pos, d]
        tile_list = layer_tiles(b)
        if use_kernels(self.kernel, alpha, gp, gs, u_h, v_h):
            mask, scratch = entry_mask(b), Scratch(alpha, tile_list, 1)
            for hs, qs, ks in tile_list:
                compat = scratch.get(0, (alpha.shape[0], hs.stop - hs.start, qs.stop - qs.start, ks.stop))
                torch.matmul(u_h[:, hs, qs], v_h[:, hs, ks].transpose(-1, -2), out=compat)  # b = u·v, recomputed
                kernels.law_rows(alpha, gp, gs, compat, mask, (hs, qs, ks), rows.t)
        else:
            _law_tiles(b, rows, u_h, v_h, zero, tile_list)
        dev = rows["alpha_sum"].sub_(1).abs_()  # |1 − Σ_j α_ij|; fully masked (padding) rows excluded
        if not zero.fast:
            dev.mul_(b.query_valid[:, None, :].to(dev.dtype))
        bound = rows["row_scale"].mul(tol_b)  # per row: the absolute tolerance from the summed terms
        res_s, scale = rows["res_s"], rows["row_scale"]
        terms = res_s.div(scale.add(res_s)).nan_to_num_(0.0)  # 0/0 only where both are 0: nothing to show
        per_row = {**rows.t, "rowsum": rows["rowsum"].abs_(), "deficit": dev,  # per head: max over batch, queries
                   "excess_s": res_s.sub(bound), "excess_r": rows["rowsum"].sub(bound), "terms": terms}
        cat = {k: x.amax((0, 2)).to("cpu", torch.float64) for k, x in per_row.items() if k != "alpha_sum"}
        law_t = value_updates(b)  # ∂L/∂v_j = Σ_i α_ij u_i per query head [batch, head, d, key]
        kv = torch.tensor(b.kv_heads, device=law_t.device)  # per query head, summed over each kv head's group
        law_kv = law_t.new_zeros(law_t.shape[0], b.grad_values.shape[2], *law_t.shape[2:]).index_add_(1, kv, law_t)
        res_v_kv = law_kv.permute(0, 3, 1, 2).sub(b.grad_values).abs_().amax(dim=(0, 1, 3)).double()
        max_v_kv = b.grad_values.abs().amax(dim=(0, 1, 3)).double()
        complete = torch.tensor(b.group_complete, dtype=torch.float64)
        self.stats.add(
            b.layer,
            b.heads,
            max_abs_residual_dscores=cat["res_s"],
            max_abs_dscores=cat["max_s"],
            max_abs_rowsum_dscores=cat["rowsum"],
            max_row_scale=cat["row_scale"],
            max_pattern_row_deficit=cat["deficit"],
            max_excess_dscores=cat["excess_s"],
            max_excess_rowsum=cat["excess_r"],
            max_terms_residual_dscores=cat["terms"],
            max_abs_residual_dpattern=cat["res_p"],
            max_abs_dpattern=cat["max_p"],
            max_abs_residual_dvalues=res_v_kv.cpu()[b.kv_heads],
            max_abs_dvalues=max_v_kv.cpu()[b.kv_heads],
            value_law_checked=complete[b.kv_heads],
            n_batches=torch.ones(len(b.heads), dtype=torch.float64),
        )

    def merge(self, other: "RoutingLawCheck") -> "RoutingLawCheck":
        self.stats.merge(other.stats)
        self.eps = max(self.eps, other.eps)
        self.softmax.update(other.softmax)
        return self

    def finalize(self) -> RoutingLawResult:
        if not self.stats:
            raise InputError("RoutingLawCheck saw no layer: run capture with it before finalize()")
        eps = max([self.eps, *self.softmax])
        tol = self.tolerance if self.tolerance is not None else eps ** (2 / 3)
        floor = "" if eps == self.eps else f"the model takes the softmax in {self.softmax[eps]}: the laws hold to {self.softmax[eps]} precision"
        rows = [judge_head(layer, head, s, tol) for layer, head, s in self.stats.rows()]
        return RoutingLawResult(rows=rows, floor=floor, tolerance_model=TOLERANCE_MODEL)


def verify_routing_law(
    model: nn.Module,
    batches: Batch | Tensor | Iterable[Batch | Tensor],
    *,
    objective: Objective | None = None,
    attention_mask: Tensor | None = None,
    layers: int | Iterable[int] | None = None,
    heads: int | Sequence[int] | Mapping[int, Sequence[int]] | None = None,
    advantage_stats: bool = True,
    tolerance: float | None = None,
) -> tuple[RoutingLawResult, AdvantageResult | None]:
    """Verify the gradient laws (and optionally stream advantage statistics) over batches.

    Args:
        model: a TransformerLens model.
        batches: one :class:`~bayesmanifold.backends.batch.Batch` or token tensor ``[batch, pos]``
            (or a string), or an iterable of them, each run as one pass.
        objective: scalar objective (default next-token loss).
        attention_mask: the padding mask of token tensors given bare (a Batch carries its own).
        tolerance: relative tolerance of the verdict (None: from the dtype, see the module doc).

    Returns:
        ``(RoutingLawResult, AdvantageResult or None)``.

    Example:
        >>> law, adv = verify_routing_law(model, tokens)  # doctest: +SKIP
        >>> law.holds, law.reason  # doctest: +SKIP
    """
    dropout = describe_active_dropout(model)
    if dropout:
        warnings.warn(dropout, RuntimeWarning, stacklevel=2)
    check = RoutingLawCheck(tolerance=tolerance)
    accs: list[Any] = [check]
    adv = AdvantageStats() if advantage_stats else None
    if adv is not None:
        accs.append(adv)
    if isinstance(batches, Tensor | Batch | np.ndarray | str):
        batches = [batches]
    with capture(model, accumulators=accs, layers=layers, heads=heads, objective=objective) as cap:
        n = 0
        for batch in batches:
            cap.run(batch, attention_mask=attention_mask)
            n += 1
        if n == 0:
            raise InputError("no batches given; expected at least one Batch or token tensor")
    law = check.finalize()
    if dropout:
        law = dataclasses.replace(law, mode=dropout)
    return law, adv.finalize() if adv is not None else None
