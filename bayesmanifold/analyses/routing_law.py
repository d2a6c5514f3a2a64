"""The gradient laws of one attention head, checked against autograd head by head.

Paper II (arXiv 2512.22473, §3; PAPERS.md §1) derives, for one head with α_ij = softmax_j(s_ij),
o_i = Σ_j α_ij v_j and upstream gradient u_i = ∂L/∂o_i, with b_ij = u_i·v_j and b̄_i = Σ_j α_ij b_ij:

    ∂L/∂α_ij = b_ij        ∂L/∂s_ij = α_ij (b_ij − b̄_i)        ∂L/∂v_j = Σ_i α_ij u_i
    Σ_j ∂L/∂s_ij = 0       (routing only redistributes attention)

:class:`RoutingLawCheck` compares autograd's ∂L/∂s, ∂L/∂α and ∂L/∂v with these closed forms,
recomputing b = u·v from the captured u and v (GQA-aware: a shared kv head's gradient sums over
its group), and judges per head whether the laws hold.

How a head is judged (the traps this avoids):

- A relative residual is ``max|autograd − law| / (max|autograd| + max|autograd − law|)``. The
  scale lies between max(|autograd|, |law|) and twice it, so it cannot vanish while the law's side
  does not: when autograd's gradient is exactly 0 and the law's is not (an intervention that
  replaces the head's output after ``hook_z``, a detached path), the relative residual is 1 and
  the head does not hold, instead of 0/0 read as "holds". It needs no extra pass over the tensors.
- When both sides are exactly 0 there is nothing to compare: the relative residual is NaN, the
  head holds only trivially, ``tested`` is False and ``reason`` says no gradient flows to it.
- The tolerance follows the dtype of the captured tensors: ``eps ** (2/3)`` (float64 3.7e-11,
  float32 2.4e-5, float16 9.8e-3, bfloat16 3.9e-2), i.e. about two thirds of the significant
  digits must agree; the float64 residuals of a healthy model are ~1e-16, float32 ~1e-7.
  ``RoutingLawCheck(tolerance=...)`` overrides it (e.g. for a model whose softmax runs in a
  lower precision than its tensors).
- Σ_j ∂L/∂s_ij is judged against max_i Σ_j α_ij |b_ij|, the size of the terms whose rounding it
  carries (not against max|∂L/∂s|, which is tiny under peaked attention while the rounding is
  not). A learned extra key in the softmax (an attention sink) leaves every entry's law intact but
  makes rows of α sum to less than 1 and Σ_j ∂L/∂s_ij = b̄_i (1 − Σ_j α_ij) ≠ 0: such a head does
  not hold, and its reason reports the row sums of α.
"""

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ..backends.batch import Batch
from ..errors import InputError
from ..hooks.bundle import LayerBundle
from ..hooks.capture import capture
from ..hooks.objectives import Objective
from .advantage import AdvantageResult, AdvantageStats
from .headstats import HeadStats, RowBuffers, Scratch, layer_tiles, zeroer

__all__ = ["RoutingLawCheck", "RoutingLawResult", "verify_routing_law", "law_tolerance"]

_CHECK_KINDS = {
    **{f"max_abs_{k}": "max" for k in ("residual_dscores", "dscores", "rowsum_dscores", "residual_dpattern", "dpattern",
                                        "residual_dvalues", "dvalues")},
    "max_row_scale": "max",  # max_i Σ_j α_ij |b_ij|
    "max_pattern_row_deficit": "max",  # max_i |1 − Σ_j α_ij| over real query rows
    "value_law_checked": "min",
    "n_batches": "sum",
}


def law_tolerance(dtype: torch.dtype) -> float:
    """The relative tolerance the laws are judged with in ``dtype``: ``eps ** (2/3)``."""
    return float(torch.finfo(dtype).eps) ** (2 / 3)


def _nanmax(vals: Iterable[float]) -> float:
    vals = [v for v in vals if not math.isnan(v)]
    return max(vals) if vals else float("nan")


@dataclass(frozen=True, eq=False)
class RoutingLawResult:
    """Per-head residuals of the gradient laws against autograd (max over every batch seen).

    Columns per head: ``max_abs_residual_*`` and ``rel_residual_*`` for ∂L/∂s (``dscores``),
    ∂L/∂α (``dpattern``) and ∂L/∂v (``dvalues``), relative as in the module docstring (NaN where
    both sides are exactly 0); ``max_abs_rowsum_dscores`` = max|Σ_j ∂L/∂s_ij| and
    ``rel_rowsum_dscores`` against max_i Σ_j α_ij|b_ij|; ``max_pattern_row_deficit`` =
    max|1 − Σ_j α_ij| over real query rows; ``value_law_checked`` (False where a kv head's group is
    not fully selected under GQA: its autograd gradient sums over heads not captured, so the value
    residuals are NaN); ``tested`` (some law had a non-zero side), ``holds``, ``tolerance`` and
    ``reason`` (why the head does not hold, or what was not tested; empty otherwise).
    """

    rows: list[dict[str, Any]]
    floor: str = ""  # which precision bounds the residuals when it is not the tensors' (and why)

    @property
    def max_abs_residual_dscores(self) -> float:
        return max(r["max_abs_residual_dscores"] for r in self.rows)

    @property
    def max_rel_residual_dscores(self) -> float:
        """Largest relative routing-law residual over the heads it was tested on (NaN: none)."""
        return _nanmax(r["rel_residual_dscores"] for r in self.rows)

    @property
    def max_abs_residual_dvalues(self) -> float:
        return _nanmax(r["max_abs_residual_dvalues"] for r in self.rows if r["value_law_checked"])

    @property
    def max_rel_residual_dvalues(self) -> float:
        return _nanmax(r["rel_residual_dvalues"] for r in self.rows if r["value_law_checked"])

    @property
    def max_abs_residual_dpattern(self) -> float:
        return max(r["max_abs_residual_dpattern"] for r in self.rows)

    @property
    def max_abs_rowsum_dscores(self) -> float:
        return max(r["max_abs_rowsum_dscores"] for r in self.rows)

    @property
    def n_layers(self) -> int:
        return len({r["layer"] for r in self.rows})

    @property
    def n_heads(self) -> int:
        return len({r["head"] for r in self.rows})

    @property
    def n_tested(self) -> int:
        """Heads with a non-zero gradient on some law's side (the others hold only trivially)."""
        return sum(bool(r["tested"]) for r in self.rows)

    @property
    def holds(self) -> bool:
        """Every head holds and at least one was tested: no gradient anywhere verifies nothing."""
        return self.n_tested > 0 and all(r["holds"] for r in self.rows)

    @property
    def reason(self) -> str:
        """Why :attr:`holds` is False, or what was not tested; empty when every law was tested and holds."""
        if self.n_tested == 0:
            return "no gradient reached any selected head (autograd and the laws are exactly 0 everywhere): nothing was tested"
        bad = [r for r in self.rows if not r["holds"]]
        if bad:
            shown = "; ".join(f"L{r['layer']}H{r['head']}: {r['reason']}" for r in bad[:3])
            more = f"; and {len(bad) - 3} more" if len(bad) > 3 else ""
            return f"{len(bad)} of {len(self.rows)} heads do not hold: {shown}{more}"
        untested = [f"L{r['layer']}H{r['head']}" for r in self.rows if not r["tested"]]
        no_route = [f"L{r['layer']}H{r['head']}" for r in self.rows if r["tested"] and math.isnan(r["rel_residual_dscores"])]
        notes = [f"no gradient flows to {', '.join(untested)}: not tested"] if untested else []
        notes += [f"no routing gradient on {', '.join(no_route)}: routing law not tested there"] if no_route else []
        return "; ".join(notes)

    def to_dict(self) -> dict[str, Any]:
        """The JSON form: the verdict, the maxima over heads, the sizes, one object per head."""
        return {
            "holds": self.holds,
            "reason": self.reason,
            "n_tested": self.n_tested,
            "max_abs_residual_dscores": self.max_abs_residual_dscores,
            "max_rel_residual_dscores": self.max_rel_residual_dscores,
            "max_abs_residual_dvalues": self.max_abs_residual_dvalues,
            "max_rel_residual_dvalues": self.max_rel_residual_dvalues,
            "max_abs_residual_dpattern": self.max_abs_residual_dpattern,
            "max_abs_rowsum_dscores": self.max_abs_rowsum_dscores,
            "n_layers": self.n_layers,
            "n_heads": self.n_heads,
            "heads": [dict(r) for r in self.rows],
            "floor": self.floor,
        }

    def summary(self) -> dict[str, Any]:
        """Same as :meth:`to_dict` (the name callers used before)."""
        return self.to_dict()

    def to_dataframe(self):
        import pandas as pd

        return pd.DataFrame(self.rows)

    def plot(self, ax=None):
        """Relative residual of the routing and value laws per head (log scale; no bar: not tested)."""
        import matplotlib.pyplot as plt

        if ax is None:
            _, ax = plt.subplots(figsize=(7, 3))
        df = self.to_dataframe()
        x = np.arange(len(df))
        tiny = np.finfo(float).tiny
        ax.bar(x - 0.2, np.maximum(df["rel_residual_dscores"], tiny), 0.4, label="∂L/∂s vs α(b − b̄)")
        ax.bar(x + 0.2, np.maximum(df["rel_residual_dvalues"].fillna(tiny), tiny), 0.4, label="∂L/∂v vs Σ α u")
        ax.plot(x, df["tolerance"], "_", color="grey", ms=10, label="tolerance")
        ax.set_yscale("log")
        labels = [f"L{r.layer}H{r.head}" + ("" if r.holds else " ✗") for r in df.itertuples()]
        ax.set_xticks(x, labels, rotation=90, fontsize=7)
        ax.set_ylabel("relative residual")
        ax.set_title("Gradient laws against autograd" + ("" if self.holds else " (✗: does not hold)"))
        ax.legend(fontsize=7)
        return ax


class RoutingLawCheck:
    """Accumulator: residuals of the routing, value and compatibility laws per head, and a verdict.

    Args:
        tolerance: relative tolerance of the judgement (None: :func:`law_tolerance` of the
            coarsest dtype captured).

    Example:
        >>> check = RoutingLawCheck()
        >>> with capture(model, accumulators=[check]) as cap:  # doctest: +SKIP
        ...     cap.run(tokens)
        >>> res = check.finalize()  # doctest: +SKIP
        >>> res.holds, res.max_rel_residual_dscores  # doctest: +SKIP
    """

    def __init__(self, *, tolerance: float | None = None) -> None:
        if tolerance is not None and not (isinstance(tolerance, int | float) and 0 < tolerance < 1):
            raise InputError(f"tolerance must be a number in (0, 1) or None (from the dtype), got {tolerance!r}")
        self.tolerance = tolerance
        self.stats = HeadStats(_CHECK_KINDS)
        self.eps = 0.0  # the coarsest machine epsilon among the tensors seen
        self.softmax: dict[float, str] = {}  # eps -> name of a softmax dtype coarser than the tensors

    def update(self, b: LayerBundle) -> None:
        alpha, u, v, gs, gp = b.pattern, b.grad_z, b.values, b.grad_scores, b.grad_pattern
        self.eps = max([self.eps] + [torch.finfo(t.dtype).eps for t in (alpha, u, v, gs, gp, b.grad_values)])
        self.softmax.update({torch.finfo(d).eps: str(d)[6:] for d in [b.softmax_dtype] if d is not None})  # HF Llama: float32
        rows = RowBuffers(["res_s", "max_s", "res_p", "max_p", "rowsum", "row_scale", "alpha_sum"], alpha)
        u_h, v_h = u.transpose(1, 2).contiguous(), v.transpose(1, 2).contiguous()  # [batch, head, pos, d]
        zero = zeroer(b)
        law_t = u_h.new_zeros(*alpha.shape[:2], u_h.shape[3], v_h.shape[2])  # Σ_i u_i α_ij [batch, head, d, key]
        tile_list = layer_tiles(b)
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
            # ∂L/∂v_j = Σ_i α_ij u_i: the tiles cover every key a query may see (α = 0 elsewhere)
            law_t[:, hs, :, ks] += torch.matmul(u_h[:, hs, qs].transpose(-1, -2), a)
        dev = rows["alpha_sum"].sub_(1).abs_()  # |1 − Σ_j α_ij|; fully masked (padding) rows excluded
        if not zero.fast:
            dev.mul_(b.query_valid[:, None, :].to(dev.dtype))
        per_row = {**rows.t, "rowsum": rows["rowsum"].abs_(), "deficit": dev}  # per head: max over batch, queries
        cat = {k: x.amax((0, 2)).to("cpu", torch.float64) for k, x in per_row.items() if k != "alpha_sum"}
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
        return RoutingLawResult(rows=[_judge(layer, head, s, tol) for layer, head, s in self.stats.rows()], floor=floor)


_LAWS = {  # what each residual compares: autograd's side, the law's side
    "dscores": ("∂L/∂s", "α(b − b̄)"),
    "dpattern": ("∂L/∂α", "b = u·v"),
    "dvalues": ("∂L/∂v", "Σ_i α_ij u_i"),
}


def _rel_and_problem(key: str, res: float, scale: float, tol: float) -> tuple[float, bool, str]:
    """(relative residual, tested, why it fails or ''): the scale cannot vanish unless both sides do."""
    grad, law = _LAWS[key]
    if scale == 0 and res == 0:
        return float("nan"), False, ""
    rel = res / (scale + res)
    if scale == 0:
        return rel, True, (f"autograd {grad} is exactly 0 but the law predicts |{law}| up to {res:.3g}: "
                           "the gradient path through this head is cut (e.g. its output is replaced after hook_z)")
    if rel > tol:
        return rel, True, f"{grad} differs from {law} by {rel:.3g} relative (tolerance {tol:.2g})"
    return rel, True, ""


def _judge(layer: int, head: int, s: dict[str, float], tol: float) -> dict[str, Any]:
    checked = bool(s["value_law_checked"])
    rel_s, tested_s, why_s = _rel_and_problem("dscores", s["max_abs_residual_dscores"], s["max_abs_dscores"], tol)
    rel_p, tested_p, why_p = _rel_and_problem("dpattern", s["max_abs_residual_dpattern"], s["max_abs_dpattern"], tol)
    rel_v, tested_v, why_v = float("nan"), False, ""
    if checked:
        rel_v, tested_v, why_v = _rel_and_problem("dvalues", s["max_abs_residual_dvalues"], s["max_abs_dvalues"], tol)
    rowsum, scale, deficit = s["max_abs_rowsum_dscores"], s["max_row_scale"], s["max_pattern_row_deficit"]
    rel_rowsum = rowsum / (scale + rowsum) if scale + rowsum > 0 else float("nan")
    why_r = ""
    if rowsum > 0 and rel_rowsum > tol:
        why_r = (f"row sums of ∂L/∂s are not 0 (max |Σ_j ∂L/∂s_ij| = {rowsum:.3g}, {rel_rowsum:.3g} of the "
                 "row's terms Σ_j α_ij|b_ij|)")
        if deficit > tol:
            why_r += (f": rows of α sum to as little as {1 - deficit:.6g}, so an attention sink or an extra key "
                      "outside the captured scores takes part in the softmax")
    problems = [w for w in (why_s, why_r, why_p, why_v) if w]
    tested = tested_s or tested_p or tested_v
    if problems:
        reason = "; ".join(problems)
    elif not tested:
        reason = "no gradient flows to this head: autograd's gradients and the laws' sides are all exactly 0 (not tested)"
    elif not tested_s:
        reason = "∂L/∂s and α(b − b̄) are exactly 0 (no routing gradient): the routing law was not tested"
    else:
        reason = ""
    return {
        "layer": layer,
        "head": head,
        "max_abs_residual_dscores": s["max_abs_residual_dscores"],
        "rel_residual_dscores": rel_s,
        "max_abs_dscores": s["max_abs_dscores"],
        "max_abs_rowsum_dscores": rowsum,
        "max_abs_residual_dpattern": s["max_abs_residual_dpattern"],
        "rel_residual_dpattern": rel_p,
        "max_abs_residual_dvalues": s["max_abs_residual_dvalues"] if checked else float("nan"),
        "rel_residual_dvalues": rel_v,
        "value_law_checked": checked,
        "n_batches": int(s["n_batches"]),
        "rel_rowsum_dscores": rel_rowsum,
        "max_pattern_row_deficit": deficit,
        "tested": tested,
        "holds": not problems,
        "tolerance": tol,
        "reason": reason,
    }


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
    return check.finalize(), adv.finalize() if adv is not None else None
