"""Probes of the EM-like vs SGD runs: does routing stabilise before the values? (Paper II, §2)

Paper II (arXiv 2512.22473) reads attention as the E-step and the value update as the M-step, and
predicts two timescales: the attention pattern (the "frame") stabilises early while the values
keep refining (PAPERS.md section 2). This module replays weights saved at checkpoints of one seed
per method through the library's capture (:func:`bayesmanifold.hooks.capture`) on a small
``HookedRootModule`` version of the single head
(:class:`bayesmanifold.experiments.em_vs_sgd.sticky_models.SingleHeadHooked`), and measures per checkpoint:

* attention drift: mean over queries of the Jensen–Shannon divergence (nats) between the
  attention rows of successive checkpoints, divided by the number of steps between them;
* value drift: ``||V_t - V_prev||_F / ||V_prev||_F`` per step, with ``V`` read at ``hook_v``;
* advantage statistics (:class:`bayesmanifold.analyses.AdvantageStats`): attention mass
  on keys with positive advantage ``A_ij = -(b_ij - b̄_i)``, and ``Σ_j α_ij |A_ij|``;
* the routing-law residual (:class:`~bayesmanifold.analyses.RoutingLawCheck`);
* responsibility specialization (:class:`~bayesmanifold.analyses.responsibility.SpecializationAccumulator`):
  each value's (key position's) responsibility ``Σ_i α_ij`` split over the 8 groups of queries
  by their previous state ``y_{t-1}`` (the state whose mean the query's input carries), and the
  normalised entropy of that split (1 = spread evenly, 0 = serves one group).

"Stabilises" is made concrete as the first checkpoint after which a drift rate stays below 10% of
its peak; the figure shows the curves so the reader can judge the claim, whichever way it falls.
"""

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor

from ...analyses.stats import entropy, js_divergence, stabilization_step

__all__ = ["ProbeResult", "probe_checkpoints", "stabilisation_step"]


def _causal_rows(fn: Any, *patterns: Tensor, block: int = 256) -> Tensor:
    """``fn`` of each row of causal patterns ``[q, k]``, computed on row blocks that stop at the
    block's last query: the entries above the diagonal are zero, and skipping them halves the work."""
    n = patterns[0].shape[0]
    return torch.cat([fn(*(m[a : a + block, : a + block] for m in patterns)) for a in range(0, n, block)])


def stabilisation_step(steps: np.ndarray, rate: np.ndarray, frac: float = 0.1) -> int | None:
    """First checkpoint step after which ``rate`` stays below ``frac`` of its peak (None if never).

    :func:`bayesmanifold.analyses.stats.stabilization_step` with the peak as the early level and a
    stable stretch of at least one checkpoint.
    """
    return stabilization_step(steps, rate, fraction=frac, min_stable=1)


@dataclass(frozen=True, eq=False)
class ProbeResult:
    """Per-checkpoint probe statistics for each probed method.

    ``rows`` holds one dict per (method, checkpoint) with ``step``, ``loss``, ``js_drift_per_step``,
    ``value_drift_per_step`` (NaN at the first checkpoint), ``mass_positive``,
    ``alpha_weighted_abs_adv``, ``spec_entropy``, ``spec_weighted_entropy``,
    ``routing_rel_residual``; ``summary`` the stabilisation steps per method.
    """

    rows: list[dict[str, Any]]
    summary: dict[str, dict[str, Any]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe: ``{"summary": ..., "rows": [...]}`` (NaN drifts stay float NaN)."""
        return {"summary": self.summary, "rows": self.rows}

    def to_dataframe(self):
        """Tidy table: one row per method and checkpoint."""
        import pandas as pd

        return pd.DataFrame(self.rows)

    def plot(self, ax=None):
        """Four panels: drift rates (log), positive-advantage mass, specialization, loss."""
        import matplotlib.pyplot as plt

        df = self.to_dataframe()
        if ax is None:
            fig, axes = plt.subplots(2, 2, figsize=(11, 7.5))
        else:
            axes = np.asarray(ax)
            fig = axes.flat[0].figure
        axes = np.asarray(axes).reshape(2, 2)
        styles = {"sgd": "-", "em_like": "--"}
        for method, d in df.groupby("method", sort=False):
            ls = styles.get(method, ":")
            d = d.sort_values("step")
            a = axes[0, 0]
            js = d["js_drift_per_step"] / np.nanmax(d["js_drift_per_step"])
            vd = d["value_drift_per_step"] / np.nanmax(d["value_drift_per_step"])
            a.plot(d["step"], js, ls, color="C0", label=f"attention (JS) {method}")
            a.plot(d["step"], vd, ls, color="C3", label=f"values {method}")
            axes[0, 1].plot(d["step"], d["mass_positive"], ls, color="C2", label=method)
            axes[1, 0].plot(d["step"], d["spec_weighted_entropy"], ls, color="C4", label=method)
            axes[1, 1].plot(d["step"], d["loss"], ls, color="k", label=method)
        axes[0, 0].set_yscale("log")
        axes[0, 0].set_title("drift per step between checkpoints (÷ own peak)")
        axes[0, 1].set_title("attention mass on positive-advantage keys")
        axes[1, 0].set_title("value responsibility entropy over 8 groups (normalised, weighted)")
        axes[1, 1].set_title("training loss (nats)")
        for a in axes.flat:
            a.set_xlabel("step")
            a.legend(fontsize=7)
        lines = []
        for m, s in self.summary.items():
            a = s["attention_stable_step"]
            v = s["values_stable_step"]
            lines.append(
                f"{m}: attention drift < 10% of peak from step {'-' if a is None else a}, "
                f"value drift from {'-' if v is None else v}"
            )
        fig.suptitle("Routing vs value dynamics, sticky chain (one seed)\n" + "; ".join(lines), fontsize=9)
        fig.tight_layout()
        return axes[0, 0]


def probe_checkpoints(
    snapshots: dict[str, list[tuple[int, tuple[Tensor, ...]]]],
    inputs: Float[Tensor, "pos d_in"],
    targets: Tensor,
    groups: Tensor,
    *,
    n_groups: int = 8,
    dtype: torch.dtype = torch.float32,
) -> ProbeResult:
    """Replay checkpointed weights through capture and measure routing vs value dynamics.

    Args:
        snapshots: ``{method: [(step, (W_Q, W_K, W_V, W_O)), ...]}`` in step order.
        inputs: the training sequence's inputs ``[pos, 20]``; targets ``[pos]``.
        groups: ``[pos]`` group label of each query (its previous state).

    Returns:
        A :class:`ProbeResult`.
    """
    from ...analyses import AdvantageStats, RoutingLawCheck, SpecializationAccumulator
    from ...hooks import Batch, capture
    from .sticky_models import SingleHeadHooked

    x = inputs.to(dtype)[None]
    batch = Batch(tokens=x, labels={"group": groups.long()[None]})
    y = targets.long()

    def objective(logits: Tensor, _inputs: Tensor) -> Tensor:
        return F.cross_entropy(logits[0], y)

    def measure(ws: tuple[Tensor, ...]) -> tuple[dict[str, float], Tensor, Tensor]:
        model = SingleHeadHooked(*(w.to(dtype) for w in ws))
        adv, law = AdvantageStats(histogram=False), RoutingLawCheck()
        spec = SpecializationAccumulator([0], 1, n_groups)
        with capture(model, accumulators=[adv, law, spec], objective=objective, keep=True) as cap:
            loss = cap.run(batch)
            kept = cap.kept[0]
        p, v = kept.pattern[0, 0], kept.values[0, :, 0]  # the only head: [q, k], [k, d_v]
        sres = spec.finalize()
        arow = adv.finalize().rows[0]
        lrow = law.finalize().to_dataframe().iloc[0]
        return {
            "loss": float(loss),
            "mass_positive": float(arow["mass_positive"]),
            "alpha_weighted_abs_adv": float(arow["alpha_weighted_abs_adv"]),
            "spec_entropy": float(sres.normalized_entropy[0, 0]),
            "spec_weighted_entropy": float(sres.weighted_entropy[0, 0]),
            "routing_rel_residual": float(lrow["rel_residual_dscores"]),
            "attention_entropy": float(_causal_rows(entropy, p).mean()),
        }, p, v

    # methods that start from the same initialisation share their first checkpoint: measure it once
    firsts: list[tuple[tuple[Tensor, ...], tuple[dict[str, float], Tensor, Tensor]]] = []
    rows: list[dict[str, Any]] = []
    summary: dict[str, dict[str, Any]] = {}
    for method, snaps in snapshots.items():
        prev_p = prev_v = None
        prev_step = None
        mrows = []
        for i, (step, ws) in enumerate(snaps):
            hit = [m for w0, m in firsts if all(torch.equal(a, b) for a, b in zip(w0, ws))] if i == 0 else []
            measured = hit[0] if hit else measure(ws)
            if i == 0 and not hit:
                firsts.append((ws, measured))
            stats, p, v = measured
            js = vd = float("nan")
            if prev_p is not None:
                gap = step - prev_step
                js = float(_causal_rows(js_divergence, p, prev_p).mean()) / gap
                vd = float((v - prev_v).norm() / prev_v.norm().clamp_min(1e-30)) / gap
            mrows.append({"method": method, "step": int(step), "loss": stats["loss"], "js_drift_per_step": js,
                          "value_drift_per_step": vd, **{k: x for k, x in stats.items() if k != "loss"}})
            prev_p, prev_v, prev_step = p, v, step
        rows += mrows
        st = np.array([r["step"] for r in mrows[1:]])
        js = np.array([r["js_drift_per_step"] for r in mrows[1:]])
        vd = np.array([r["value_drift_per_step"] for r in mrows[1:]])
        a_st, v_st = stabilisation_step(st, js), stabilisation_step(st, vd)
        summary[method] = {
            "attention_stable_step": a_st,
            "values_stable_step": v_st,
            "routing_first": (a_st is not None and (v_st is None or a_st < v_st)),
            "js_drift_last_over_peak": float(js[-1] / np.nanmax(js)) if js.size else None,
            "value_drift_last_over_peak": float(vd[-1] / np.nanmax(vd)) if vd.size else None,
            "max_routing_rel_residual": float(max(r["routing_rel_residual"] for r in mrows)),
        }
    return ProbeResult(rows=rows, summary=summary)
