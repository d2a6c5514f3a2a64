"""Probes of the EM-like vs SGD runs: does routing stabilise before the values? (Paper II, §2)

Paper II (arXiv 2512.22473) reads attention as the E-step and the value update as the M-step, and
predicts two timescales: the attention pattern (the "frame") stabilises early while the values
keep refining (PAPERS.md section 2). This module replays weights saved at checkpoints of one seed
per method through the library's capture (:func:`bayesmanifold.hooks.capture`) on a small
``HookedRootModule`` version of the single head, and measures per checkpoint:

* attention drift: mean over queries of the Jensen–Shannon divergence (nats) between the
  attention rows of successive checkpoints, divided by the number of steps between them;
* value drift: ``||V_t - V_prev||_F / ||V_prev||_F`` per step, with ``V`` read at ``hook_v``;
* advantage statistics (:class:`bayesmanifold.analyses.routing.AdvantageStats`): attention mass
  on keys with positive advantage ``A_ij = -(b_ij - b̄_i)``, and ``Σ_j α_ij |A_ij|``;
* the routing-law residual (:class:`~bayesmanifold.analyses.routing.RoutingLawCheck`);
* responsibility specialization (:class:`~bayesmanifold.analyses.responsibility.SpecializationAccumulator`):
  each value's (key position's) responsibility ``Σ_i α_ij`` split over the 8 groups of queries
  by their previous state ``y_{t-1}`` (the state whose mean the query's input carries), and the
  normalised entropy of that split (1 = spread evenly, 0 = serves one group).

"Stabilises" is made concrete as the first checkpoint after which a drift rate stays below 10% of
its peak; the figure shows the curves so the reader can judge the claim, whichever way it falls.
"""

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor, nn

from ..errors import InputError

__all__ = ["SingleHeadHooked", "ProbeResult", "probe_checkpoints", "stabilisation_step"]


class _Attention(nn.Module):
    def __init__(self, W_Q: Tensor, W_K: Tensor, W_V: Tensor) -> None:
        super().__init__()
        from transformer_lens.hook_points import HookPoint

        self.W_Q = nn.Parameter(W_Q.detach().clone())
        self.W_K = nn.Parameter(W_K.detach().clone())
        self.W_V = nn.Parameter(W_V.detach().clone())
        self.attn_scale = math.sqrt(W_Q.shape[-1])
        self.hook_q = HookPoint()
        self.hook_k = HookPoint()
        self.hook_v = HookPoint()
        self.hook_attn_scores = HookPoint()
        self.hook_pattern = HookPoint()
        self.hook_z = HookPoint()

    def forward(self, x: Float[Tensor, "batch pos d_in"]) -> Float[Tensor, "batch pos head_index d_head"]:
        q = self.hook_q((x @ self.W_Q)[:, :, None, :])  # [batch, pos, head_index=1, d_head]
        k = self.hook_k((x @ self.W_K)[:, :, None, :])
        v = self.hook_v((x @ self.W_V)[:, :, None, :])
        scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / self.attn_scale
        n = x.shape[1]
        causal = torch.ones(n, n, dtype=torch.bool, device=x.device).triu(1)
        scores = self.hook_attn_scores(scores.masked_fill(causal, float("-inf")))
        pattern = self.hook_pattern(torch.softmax(scores, dim=-1))
        return self.hook_z(torch.einsum("bhqk,bkhd->bqhd", pattern, v))


class _Block(nn.Module):
    def __init__(self, attn: _Attention) -> None:
        super().__init__()
        self.attn = attn


def _hooked_root():
    try:
        from transformer_lens import HookedRootModule
    except ImportError:  # pragma: no cover - older TransformerLens
        from transformer_lens.hook_points import HookedRootModule
    return HookedRootModule


class SingleHeadHooked(_hooked_root()):
    """Paper II's single causal head as a TransformerLens ``HookedRootModule``.

    Float input ``[batch, pos, 20]``; hook points ``blocks.0.attn.hook_q``, ``hook_k``, ``hook_v``,
    ``hook_attn_scores`` (masked entries ``-inf``), ``hook_pattern``, ``hook_z`` in TL's shapes; no
    residual, no bias; logits ``z W_O``. Built from the four weight matrices of a run.

    Example:
        >>> from bayesmanifold.experiments.em_vs_sgd import init_weights
        >>> model = SingleHeadHooked(*init_weights(42))
        >>> model(torch.randn(1, 5, 20)).shape
        torch.Size([1, 5, 8])
    """

    def __init__(self, W_Q: Tensor, W_K: Tensor, W_V: Tensor, W_O: Tensor) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([_Block(_Attention(W_Q, W_K, W_V))])
        self.W_O = nn.Parameter(W_O.detach().clone())
        self.setup()

    def forward(self, x: Float[Tensor, "batch pos d_in"]) -> Float[Tensor, "batch pos n_states"]:
        if not torch.is_floating_point(x) or x.ndim != 3 or x.shape[-1] != self.blocks[0].attn.W_Q.shape[0]:
            raise InputError(
                f"SingleHeadHooked takes float inputs [batch, pos, {self.blocks[0].attn.W_Q.shape[0]}]; "
                f"got {tuple(x.shape)} {x.dtype}"
            )
        z = self.blocks[0].attn(x)
        return z[:, :, 0, :] @ self.W_O


class _KeepPatternValues:
    """Accumulator that keeps the (only) head's pattern and values of the last run (cloned)."""

    def __init__(self) -> None:
        self.pattern: Tensor | None = None
        self.values: Tensor | None = None

    def update(self, bundle: Any) -> None:
        self.pattern = bundle.pattern[0, 0].detach().clone()
        self.values = bundle.values[0, :, 0].detach().clone()

    def merge(self, other: "_KeepPatternValues") -> "_KeepPatternValues":
        raise InputError("_KeepPatternValues keeps one run; it does not merge")

    def finalize(self) -> tuple[Tensor, Tensor]:
        return self.pattern, self.values


def _js_rows(p: Tensor, q: Tensor) -> Tensor:
    """Jensen–Shannon divergence (nats) between rows of two causal patterns."""
    m = 0.5 * (p + q)

    def kl(a: Tensor) -> Tensor:
        return torch.where(a > 0, a * (a.clamp_min(1e-300).log() - m.clamp_min(1e-300).log()), 0.0).sum(-1)

    return 0.5 * kl(p) + 0.5 * kl(q)


def stabilisation_step(steps: np.ndarray, rate: np.ndarray, frac: float = 0.1) -> int | None:
    """First checkpoint step after which ``rate`` stays below ``frac`` of its peak (None if never)."""
    if rate.size == 0 or not np.isfinite(rate).any():
        return None
    thr = frac * np.nanmax(rate)
    above = np.nonzero(rate >= thr)[0]
    last = above[-1] if above.size else -1
    return int(steps[last + 1]) if last + 1 < len(steps) else None


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

    def to_dataframe(self):
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
    from ..analyses.responsibility import SpecializationAccumulator
    from ..analyses.routing import AdvantageStats, RoutingLawCheck
    from ..hooks import capture

    x = inputs.to(dtype)[None]
    y = targets.long()

    def objective(logits: Tensor, _inputs: Tensor) -> Tensor:
        return F.cross_entropy(logits[0], y)

    rows: list[dict[str, Any]] = []
    summary: dict[str, dict[str, Any]] = {}
    for method, snaps in snapshots.items():
        prev_p = prev_v = None
        prev_step = None
        mrows = []
        for step, ws in snaps:
            model = SingleHeadHooked(*(w.to(dtype) for w in ws))
            keep, adv, law = _KeepPatternValues(), AdvantageStats(histogram=False), RoutingLawCheck()
            with capture(model, accumulators=[keep, adv, law], objective=objective) as cap:
                loss = cap.run(x)
            p, v = keep.finalize()
            spec = SpecializationAccumulator([0], 1, n_groups)
            spec.update(0, p[None, None], groups[None])
            sres = spec.finalize()
            arow = adv.finalize().rows[0]
            lrow = law.finalize().to_dataframe().iloc[0]
            js = vd = float("nan")
            if prev_p is not None:
                gap = step - prev_step
                js = float(_js_rows(p.double(), prev_p.double()).mean()) / gap
                vd = float((v - prev_v).norm() / prev_v.norm().clamp_min(1e-30)) / gap
            mrows.append({
                "method": method,
                "step": int(step),
                "loss": float(loss),
                "js_drift_per_step": js,
                "value_drift_per_step": vd,
                "mass_positive": float(arow["mass_positive"]),
                "alpha_weighted_abs_adv": float(arow["alpha_weighted_abs_adv"]),
                "spec_entropy": float(sres.normalized_entropy[0, 0]),
                "spec_weighted_entropy": float(sres.weighted_entropy[0, 0]),
                "routing_rel_residual": float(lrow["rel_residual_dscores"]),
                "attention_entropy": float(-(torch.where(p > 0, p * p.clamp_min(1e-30).log(), 0.0)).sum(-1).mean()),
            })
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
