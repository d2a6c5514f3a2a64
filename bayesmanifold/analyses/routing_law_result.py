"""The verdict of :class:`~bayesmanifold.analyses.routing_law.RoutingLawCheck`: per-head judging and the result.

The tolerance model (stated in every result's ``tolerance_model``):

- **Routing law** ∂L/∂s_ij = α_ij (b_ij − b̄_i). Its value is a difference of the terms α_ij b_ij and
  α_ij b̄_i, and both sides carry the rounding of those terms, not of the (possibly far smaller)
  difference. On an attention-sink head (α_i0 ≈ 1) the law's value is ~1000× below its terms, so a
  tolerance relative to max|∂L/∂s| flips with the batch size. Each query row i is therefore judged
  against an **absolute bound from the magnitudes summed in that row**:

      max_j |∂L/∂s_ij − α_ij (b_ij − b̄_i)|  <=  tol · Σ_j α_ij |b_ij|

  (Σ_j α_ij |b_ij| also bounds Σ_j α_ij |b̄_i| = |b̄_i|), with ``tol = eps ** (2/3)`` of the
  coarsest precision involved: the captured tensors' dtype or, where coarser, the dtype the
  backend takes the softmax in (HF Llama-family attention: float32). No scale is divided by.
  Where the whole head's routing gradient lies within that bound (max|∂L/∂s| <= tol ·
  max_i Σ_j α_ij|b_ij|), the law holds only to the precision of its terms and the head says so.
  A head whose autograd ∂L/∂s is exactly 0 while the law's side is not does not hold (a cut path).
- **Row sums** Σ_j ∂L/∂s_ij = 0: judged per row against the same bound.
- **∂L/∂α = b** and **∂L/∂v = Σ_i α_ij u_i**: relative residual
  ``max|autograd − law| / (max|autograd| + max|autograd − law|)`` <= tol (the scale cannot vanish
  unless both sides do; both exactly 0: not tested).
"""

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

__all__ = ["RoutingLawResult", "law_tolerance", "judge_head", "TOLERANCE_MODEL"]

TOLERANCE_MODEL = (
    "routing law and row sums: per query row, max_j|∂L/∂s_ij − α_ij(b_ij − b̄_i)| and |Σ_j ∂L/∂s_ij| <= "
    "tol·Σ_j α_ij|b_ij| (the size of the summed terms); ∂L/∂α and ∂L/∂v: max|autograd − law| <= "
    "tol·(max|autograd| + max|autograd − law|); tol = eps^(2/3) of the coarser of the tensors' and the "
    "softmax's dtype unless given"
)


def law_tolerance(dtype: torch.dtype) -> float:
    """The relative tolerance the laws are judged with in ``dtype``: ``eps ** (2/3)``."""
    return float(torch.finfo(dtype).eps) ** (2 / 3)


def _nanmax(vals) -> float:
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
    ``reason`` (why the head does not hold, or what was not tested; empty otherwise);
    ``terms_residual_dscores`` (the routing residual against its row's terms Σ_j α_ij|b_ij|, the
    judged quantity), ``abs_tolerance_dscores`` (tol × the largest row's terms) and
    ``routing_at_rounding`` (the whole routing gradient lies within the rounding of its terms).
    """

    rows: list[dict[str, Any]]
    floor: str = ""  # which precision bounds the residuals when it is not the tensors' (and why)
    tolerance_model: str = TOLERANCE_MODEL  # how each law is judged (module docstring)
    mode: str = ""  # what about the model's mode the verdict depends on (train mode with active dropout)

    @property
    def max_abs_residual_dscores(self) -> float:
        return max(r["max_abs_residual_dscores"] for r in self.rows)

    @property
    def max_rel_residual_dscores(self) -> float:
        """Largest relative routing-law residual over the heads it was tested on (NaN: none)."""
        return _nanmax(r["rel_residual_dscores"] for r in self.rows)

    @property
    def max_terms_residual_dscores(self) -> float:
        """Largest routing-law residual relative to its row's summed terms Σ_j α_ij|b_ij| (what is judged)."""
        return _nanmax(r["terms_residual_dscores"] for r in self.rows)

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
        if self.mode:
            plain = dataclasses.replace(self, mode="").reason
            return self.mode + (f"; {plain}" if plain else "")
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
        sinks = [f"L{r['layer']}H{r['head']}" for r in self.rows if r.get("routing_at_rounding")]
        notes += [f"on {', '.join(sinks)} the routing gradient is within the rounding of its terms (attention sink): "
                  "the routing law holds there only to that precision"] if sinks else []
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
            "max_terms_residual_dscores": self.max_terms_residual_dscores,
            "max_abs_residual_dvalues": self.max_abs_residual_dvalues,
            "max_rel_residual_dvalues": self.max_rel_residual_dvalues,
            "max_abs_residual_dpattern": self.max_abs_residual_dpattern,
            "max_abs_rowsum_dscores": self.max_abs_rowsum_dscores,
            "n_layers": self.n_layers,
            "n_heads": self.n_heads,
            "heads": [dict(r) for r in self.rows],
            "floor": self.floor,
            "mode": self.mode,
            "tolerance": max((r["tolerance"] for r in self.rows), default=float("nan")),
            "tolerance_model": self.tolerance_model,
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


def _routing_problem(s: dict[str, float], tol: float) -> tuple[float, bool, str, str]:
    """(relative residual, tested, why the routing law fails or '', a note) from the per-row bound."""
    rel, tested, why = _rel_and_problem("dscores", s["max_abs_residual_dscores"], s["max_abs_dscores"], tol)
    if not tested or why.startswith("autograd"):  # nothing to compare, or a cut path (judged as before)
        return rel, tested, why, ""
    why = ""
    if s["max_excess_dscores"] > 0:
        why = (f"∂L/∂s differs from α(b − b̄) by up to {s['max_abs_residual_dscores']:.3g}, beyond the rounding "
               f"bound of the summed terms in some row ({s['max_terms_residual_dscores']:.3g} of Σ_j α_ij|b_ij|; "
               f"tolerance {tol:.2g})")
    note = ""
    if not why and s["max_abs_dscores"] <= tol * s["max_row_scale"]:
        note = (f"the routing gradient (max|∂L/∂s| = {s['max_abs_dscores']:.3g}) is within the rounding of its terms "
                f"(Σ_j α_ij|b_ij| up to {s['max_row_scale']:.3g}), as on an attention-sink head: the routing law holds "
                "only to the precision of its terms there")
    return rel, tested, why, note


def judge_head(layer: int, head: int, s: dict[str, float], tol: float) -> dict[str, Any]:
    """One head's row of a :class:`RoutingLawResult` from its accumulated statistics."""
    checked = bool(s["value_law_checked"])
    rel_s, tested_s, why_s, note_s = _routing_problem(s, tol)
    rel_p, tested_p, why_p = _rel_and_problem("dpattern", s["max_abs_residual_dpattern"], s["max_abs_dpattern"], tol)
    rel_v, tested_v, why_v = float("nan"), False, ""
    if checked:
        rel_v, tested_v, why_v = _rel_and_problem("dvalues", s["max_abs_residual_dvalues"], s["max_abs_dvalues"], tol)
    rowsum, scale, deficit = s["max_abs_rowsum_dscores"], s["max_row_scale"], s["max_pattern_row_deficit"]
    rel_rowsum = rowsum / (scale + rowsum) if scale + rowsum > 0 else float("nan")
    why_r = ""
    if rowsum > 0 and s["max_excess_rowsum"] > 0:
        why_r = (f"row sums of ∂L/∂s are not 0 (max |Σ_j ∂L/∂s_ij| = {rowsum:.3g}, beyond {tol:.2g} × the row's terms "
                 "Σ_j α_ij|b_ij|)")
        if deficit > tol:
            why_r += (f": rows of α sum to as little as {1 - deficit:.6g}, so an attention sink or an extra key "
                      "outside the captured scores takes part in the softmax")
    judged = ["max_abs_residual_dscores", "max_abs_dscores", "max_row_scale", "max_excess_dscores", "max_abs_rowsum_dscores",
              "max_excess_rowsum", "max_abs_residual_dpattern", "max_abs_dpattern"]
    judged += ["max_abs_residual_dvalues", "max_abs_dvalues"] if checked else []
    nonfinite = [k for k in judged if not math.isfinite(s[k])]
    why_n = (f"non-finite values (NaN or infinity) in {', '.join(nonfinite)}: autograd's gradients or the captured "
             "tensors hold NaN or infinity, so the laws cannot be judged") if nonfinite else ""
    problems = [w for w in (why_n, why_s, why_r, why_p, why_v) if w]
    tested = tested_s or tested_p or tested_v or bool(nonfinite)
    if problems:
        reason = "; ".join(problems)
    elif not tested:
        reason = "no gradient flows to this head: autograd's gradients and the laws' sides are all exactly 0 (not tested)"
    elif not tested_s:
        reason = "∂L/∂s and α(b − b̄) are exactly 0 (no routing gradient): the routing law was not tested"
    else:
        reason = note_s
    return {
        "layer": layer,
        "head": head,
        "max_abs_residual_dscores": s["max_abs_residual_dscores"],
        "rel_residual_dscores": rel_s,
        "terms_residual_dscores": s["max_terms_residual_dscores"],
        "abs_tolerance_dscores": tol * s["max_row_scale"],
        "max_row_scale": s["max_row_scale"],
        "routing_at_rounding": bool(note_s),
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


