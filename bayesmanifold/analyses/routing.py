"""The advantage-based routing law: verification, advantage statistics, and a one-step check.

Paper II (arXiv 2512.22473, §3; PAPERS.md §1) derives, for one head with α_ij = softmax_j(s_ij),
o_i = Σ_j α_ij v_j and upstream gradient u_i = ∂L/∂o_i, with b_ij = u_i·v_j and b̄_i = Σ_j α_ij b_ij:

    ∂L/∂α_ij = b_ij        ∂L/∂s_ij = α_ij (b_ij − b̄_i)        ∂L/∂v_j = Σ_i α_ij u_i
    Σ_j ∂L/∂s_ij = 0       (routing only redistributes attention)

The advantage of key j for query i is A_ij = −(b_ij − b̄_i): gradient descent moves
s_ij by +η α_ij A_ij, so attention grows on keys whose value points along −u_i.

- :class:`RoutingLawCheck` compares autograd's ∂L/∂s, ∂L/∂v and ∂L/∂α with the laws, recomputing
  b = u·v from the captured u and v (GQA-aware: a shared kv head's gradient sums over its group).
- :class:`AdvantageStats` streams the distribution of A on unmasked entries, the attention mass on
  positive-advantage keys, the α-weighted advantage and the concentration of the routing gradient.
- :func:`one_step_check` takes a small gradient step on a copy of the model and measures whether
  attention moved toward the keys with positive advantage.
"""

import copy
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ..errors import ConfigError, InputError
from ..hooks.capture import LayerBundle, capture
from ..hooks.objectives import Objective
from .headstats import HeadStats

__all__ = [
    "RoutingLawCheck",
    "RoutingLawResult",
    "AdvantageStats",
    "AdvantageResult",
    "OneStepResult",
    "one_step_check",
    "verify_routing_law",
    "advantage",
]


def advantage(pattern: Tensor, compat: Tensor) -> Tensor:
    """A_ij = −(b_ij − b̄_i) with b̄_i = Σ_j α_ij b_ij; shapes ``[..., query_pos, key_pos]``."""
    return (pattern * compat).sum(-1, keepdim=True) - compat


def _entry_mask(b: LayerBundle) -> Tensor:
    """Bool[batch, 1, query_pos, key_pos]: valid entries of valid query rows."""
    return (b.valid & b.query_valid[:, :, None])[:, None]


def _amax_heads(t: Tensor) -> Tensor:
    """Per-head max over every dimension but the head one (dim 1), as float64."""
    return t.transpose(0, 1).reshape(t.shape[1], -1).amax(dim=1).double() if t.numel() else t.new_zeros(t.shape[1])


# ---------------------------------------------------------------------------------------------
# Verification
# ---------------------------------------------------------------------------------------------

_CHECK_KINDS = {
    "max_abs_residual_dscores": "max",
    "max_abs_dscores": "max",
    "max_abs_rowsum_dscores": "max",
    "max_abs_residual_dpattern": "max",
    "max_abs_dpattern": "max",
    "max_abs_residual_dvalues": "max",
    "max_abs_dvalues": "max",
    "value_law_checked": "min",
    "n_batches": "sum",
}


@dataclass(frozen=True, eq=False)
class RoutingLawResult:
    """Per-head residuals of the gradient laws against autograd (max over every batch seen).

    Relative residuals are ``max|autograd − law| / max|autograd|`` per head. Where a kv head's
    group is not fully selected (GQA with a head subset) the value law cannot be checked:
    ``value_law_checked`` is False and its residuals are NaN for that reason.
    """

    rows: list[dict[str, Any]]

    @property
    def max_abs_residual_dscores(self) -> float:
        return max(r["max_abs_residual_dscores"] for r in self.rows)

    @property
    def max_rel_residual_dscores(self) -> float:
        return max(r["rel_residual_dscores"] for r in self.rows)

    @property
    def max_abs_residual_dvalues(self) -> float:
        vals = [r["max_abs_residual_dvalues"] for r in self.rows if r["value_law_checked"]]
        return max(vals) if vals else float("nan")

    @property
    def max_rel_residual_dvalues(self) -> float:
        vals = [r["rel_residual_dvalues"] for r in self.rows if r["value_law_checked"]]
        return max(vals) if vals else float("nan")

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

    def summary(self) -> dict[str, Any]:
        """The JSON form: the maxima over heads, the sizes, and one object per layer and head."""
        return {
            "max_abs_residual_dscores": self.max_abs_residual_dscores,
            "max_rel_residual_dscores": self.max_rel_residual_dscores,
            "max_abs_residual_dvalues": self.max_abs_residual_dvalues,
            "max_rel_residual_dvalues": self.max_rel_residual_dvalues,
            "max_abs_residual_dpattern": self.max_abs_residual_dpattern,
            "max_abs_rowsum_dscores": self.max_abs_rowsum_dscores,
            "n_layers": self.n_layers,
            "n_heads": self.n_heads,
            "heads": [dict(r) for r in self.rows],
        }

    def to_dataframe(self):
        import pandas as pd

        return pd.DataFrame(self.rows)

    def plot(self, ax=None):
        """Relative residual of the routing and value laws per head (log scale)."""
        import matplotlib.pyplot as plt

        if ax is None:
            _, ax = plt.subplots(figsize=(7, 3))
        df = self.to_dataframe()
        x = np.arange(len(df))
        tiny = np.finfo(float).tiny
        ax.bar(x - 0.2, np.maximum(df["rel_residual_dscores"], tiny), 0.4, label="∂L/∂s vs α(b − b̄)")
        ax.bar(x + 0.2, np.maximum(df["rel_residual_dvalues"].fillna(tiny), tiny), 0.4, label="∂L/∂v vs Σ α u")
        ax.set_yscale("log")
        ax.set_xticks(x, [f"L{r.layer}H{r.head}" for r in df.itertuples()], rotation=90, fontsize=7)
        ax.set_ylabel("relative residual")
        ax.set_title("Gradient laws against autograd")
        ax.legend(fontsize=7)
        return ax


class RoutingLawCheck:
    """Accumulator: residuals of the routing, value and compatibility laws per head.

    Example:
        >>> check = RoutingLawCheck()
        >>> with capture(model, accumulators=[check]) as cap:  # doctest: +SKIP
        ...     cap.run(tokens)
        >>> check.finalize().max_rel_residual_dscores  # doctest: +SKIP
    """

    def __init__(self) -> None:
        self.stats = HeadStats(_CHECK_KINDS)

    def update(self, b: LayerBundle) -> None:
        alpha, u, v = b.pattern, b.grad_z, b.values
        compat = torch.einsum("bqhd,bkhd->bhqk", u, v)
        law_s = alpha * (compat - (alpha * compat).sum(-1, keepdim=True))
        gs = b.grad_scores
        mask = _entry_mask(b)
        res_s = _amax_heads((gs - law_s).abs())
        del law_s
        res_p = _amax_heads(torch.where(mask, b.grad_pattern - compat, 0).abs())
        max_p = _amax_heads(torch.where(mask, b.grad_pattern, 0).abs())
        del compat
        rowsum = _amax_heads(gs.sum(-1).abs())
        # ∂L/∂v_j = Σ_i α_ij u_i per query head, summed over each kv head's group.
        law_vq = torch.einsum("bhqk,bqhd->bkhd", alpha, u)
        kv = torch.tensor(b.kv_heads, device=law_vq.device)
        law_v = law_vq.new_zeros(b.grad_values.shape).index_add_(2, kv, law_vq)
        res_v_kv = (b.grad_values - law_v).abs().amax(dim=(0, 1, 3)).double()
        max_v_kv = b.grad_values.abs().amax(dim=(0, 1, 3)).double()
        complete = torch.tensor(b.group_complete, dtype=torch.float64)
        self.stats.add(
            b.layer,
            b.heads,
            max_abs_residual_dscores=res_s,
            max_abs_dscores=_amax_heads(gs.abs()),
            max_abs_rowsum_dscores=rowsum,
            max_abs_residual_dpattern=res_p,
            max_abs_dpattern=max_p,
            max_abs_residual_dvalues=res_v_kv.cpu()[b.kv_heads],
            max_abs_dvalues=max_v_kv.cpu()[b.kv_heads],
            value_law_checked=complete[b.kv_heads],
            n_batches=torch.ones(len(b.heads), dtype=torch.float64),
        )

    def merge(self, other: "RoutingLawCheck") -> "RoutingLawCheck":
        self.stats.merge(other.stats)
        return self

    def finalize(self) -> RoutingLawResult:
        if not self.stats:
            raise InputError("RoutingLawCheck saw no layer: run capture with it before finalize()")
        rows = []
        for layer, head, s in self.stats.rows():
            checked = bool(s["value_law_checked"])
            rows.append(
                {
                    "layer": layer,
                    "head": head,
                    "max_abs_residual_dscores": s["max_abs_residual_dscores"],
                    "rel_residual_dscores": _rel(s["max_abs_residual_dscores"], s["max_abs_dscores"]),
                    "max_abs_dscores": s["max_abs_dscores"],
                    "max_abs_rowsum_dscores": s["max_abs_rowsum_dscores"],
                    "max_abs_residual_dpattern": s["max_abs_residual_dpattern"],
                    "rel_residual_dpattern": _rel(s["max_abs_residual_dpattern"], s["max_abs_dpattern"]),
                    "max_abs_residual_dvalues": s["max_abs_residual_dvalues"] if checked else float("nan"),
                    "rel_residual_dvalues": _rel(s["max_abs_residual_dvalues"], s["max_abs_dvalues"])
                    if checked
                    else float("nan"),
                    "value_law_checked": checked,
                    "n_batches": int(s["n_batches"]),
                }
            )
        return RoutingLawResult(rows=rows)


def _rel(res: float, scale: float) -> float:
    # A head with identically zero gradient has nothing to verify: its residual is 0 too.
    return res / scale if scale > 0 else 0.0


# ---------------------------------------------------------------------------------------------
# Advantage statistics
# ---------------------------------------------------------------------------------------------

# Histogram of A on a symmetric log grid: |A| from 1e-12 to 1e4, 8 bins per decade, both signs.
_HIST_POS = torch.logspace(-12, 4, 129, dtype=torch.float64)
HIST_EDGES = torch.cat([-_HIST_POS.flip(0), _HIST_POS])

_ADV_KINDS = {
    "n_entries": "sum",
    "n_positive": "sum",
    "sum_adv": "sum",
    "sum_adv_sq": "sum",
    "min_adv": "min",
    "max_adv": "max",
    "n_queries": "sum",
    "sum_mass_positive": "sum",
    "sum_alpha_adv": "sum",
    "sum_abs_alpha_adv": "sum",
    "sum_alpha_abs_adv": "sum",
    "n_routing_queries": "sum",
    "sum_top1_share": "sum",
    "sum_effective_keys": "sum",
    "n_argmax_positive": "sum",
}


@dataclass(frozen=True, eq=False)
class AdvantageResult:
    """Advantage statistics per head, over every batch seen.

    Columns of :meth:`to_dataframe`: ``mean_adv``/``std_adv``/``min_adv``/``max_adv`` and
    ``frac_positive`` over unmasked (query, key) entries; ``mass_positive``, the mean over queries
    of the attention mass on keys with A > 0; ``alpha_weighted_adv``, the mean over queries of
    Σ_j α_ij A_ij, zero by construction (an identity check: rows sum to 1); ``alpha_weighted_abs_adv``,
    the mean of Σ_j α_ij |A_ij|; ``argmax_positive``, the share of queries whose most attended key
    has A > 0; ``routing_top1_share`` and ``routing_effective_keys``, how concentrated
    |∂L/∂s_i·| is per query (share of the largest entry; exp of its entropy), over queries with a
    non-zero routing gradient.
    """

    rows: list[dict[str, Any]]
    histograms: dict[tuple[int, int], np.ndarray]
    edges: np.ndarray

    def to_dataframe(self):
        import pandas as pd

        return pd.DataFrame(self.rows)

    def quantile(self, layer: int, head: int, q: float) -> float:
        """Approximate quantile of A for one head from its log-grid histogram (bin edges)."""
        if not 0 <= q <= 1:
            raise InputError(f"quantile q must lie in [0, 1], got {q}")
        hist = self.histograms[(layer, head)]
        cdf = np.cumsum(hist) / max(hist.sum(), 1)
        i = int(np.searchsorted(cdf, q))
        lo = np.concatenate([[-np.inf], self.edges])
        hi = np.concatenate([self.edges, [np.inf]])
        return float(hi[i] if np.isfinite(hi[i]) else lo[i])

    def plot(self, ax=None):
        """Attention mass on positive-advantage keys, per layer and head (a heat map)."""
        import matplotlib.pyplot as plt

        if ax is None:
            _, ax = plt.subplots(figsize=(5, 3))
        df = self.to_dataframe()
        grid = df.pivot(index="layer", columns="head", values="mass_positive")
        im = ax.imshow(grid.values, vmin=0, vmax=1, cmap="viridis", aspect="auto")
        ax.set_xticks(range(grid.shape[1]), grid.columns)
        ax.set_yticks(range(grid.shape[0]), grid.index)
        ax.set_xlabel("head")
        ax.set_ylabel("layer")
        ax.set_title("Attention mass on keys with positive advantage")
        ax.figure.colorbar(im, ax=ax)
        return ax


class AdvantageStats:
    """Accumulator: the distribution of advantages A_ij and how attention sits on them, per head.

    Uses autograd's ∂L/∂α for b (no recomputation), and only unmasked entries of unmasked rows.
    """

    def __init__(self, *, histogram: bool = True) -> None:
        self.histogram = histogram
        self.stats = HeadStats(_ADV_KINDS)
        self.hist: dict[int, Tensor] = {}

    def update(self, b: LayerBundle) -> None:
        alpha = b.pattern
        mask = _entry_mask(b)
        adv = torch.where(mask, advantage(alpha, torch.where(mask, b.grad_pattern, 0)), 0)
        dims = (0, 2, 3)
        maskf = mask.to(adv.dtype)
        n_entries = maskf.sum(dims).expand(len(b.heads))
        pos = (adv > 0) & mask
        qv = b.query_valid[:, None, :].to(adv.dtype)  # [batch, 1, query]
        n_q = qv.sum().expand(len(b.heads))
        mass_pos = (alpha * pos).sum(-1)
        alpha_adv = (alpha * adv).sum(-1)
        alpha_abs = (alpha * adv.abs()).sum(-1)
        argmax_pos = pos.gather(-1, alpha.argmax(-1, keepdim=True)).squeeze(-1)
        g = b.grad_scores.abs()
        tot = g.sum(-1)
        live = (tot > 0) & b.query_valid[:, None, :]
        p = g / torch.where(tot > 0, tot, 1)[..., None]
        ent = -(p * torch.log(torch.where(p > 0, p, 1))).sum(-1)
        inf = torch.tensor(float("inf"), dtype=adv.dtype, device=adv.device)
        self.stats.add(
            b.layer,
            b.heads,
            n_entries=n_entries,
            n_positive=pos.sum(dims),
            sum_adv=adv.double().sum(dims),
            sum_adv_sq=(adv.double() ** 2).sum(dims),
            min_adv=_amin_heads(torch.where(mask, adv, inf)),
            max_adv=_amax_heads(torch.where(mask, adv, -inf)),
            n_queries=n_q,
            sum_mass_positive=(mass_pos * qv).double().sum((0, 2)),
            sum_alpha_adv=(alpha_adv * qv).double().sum((0, 2)),
            sum_abs_alpha_adv=(alpha_adv.abs() * qv).double().sum((0, 2)),
            sum_alpha_abs_adv=(alpha_abs * qv).double().sum((0, 2)),
            n_argmax_positive=(argmax_pos & b.query_valid[:, None, :]).sum((0, 2)),
            n_routing_queries=live.sum((0, 2)),
            sum_top1_share=torch.where(live, g.amax(-1) / torch.where(tot > 0, tot, 1), 0).double().sum((0, 2)),
            sum_effective_keys=torch.where(live, ent.exp(), 0).double().sum((0, 2)),
        )
        if self.histogram:
            edges = HIST_EDGES.to(adv.device, adv.dtype)
            nb = len(edges) + 1
            idx = torch.bucketize(adv, edges) + torch.arange(len(b.heads), device=adv.device)[None, :, None, None] * nb
            counts = torch.bincount(idx[mask.expand_as(idx)], minlength=nb * len(b.heads)).view(len(b.heads), nb)
            counts = counts.cpu().double()
            self.hist[b.layer] = self.hist[b.layer] + counts if b.layer in self.hist else counts

    def merge(self, other: "AdvantageStats") -> "AdvantageStats":
        self.stats.merge(other.stats)
        for layer, h in other.hist.items():
            self.hist[layer] = self.hist[layer] + h if layer in self.hist else h.clone()
        return self

    def finalize(self) -> AdvantageResult:
        if not self.stats:
            raise InputError("AdvantageStats saw no layer: run capture with it before finalize()")
        rows, hists = [], {}
        for layer, head, s in self.stats.rows():
            n, nq, nr = s["n_entries"], s["n_queries"], s["n_routing_queries"]
            mean = s["sum_adv"] / n if n else 0.0
            var = max(s["sum_adv_sq"] / n - mean**2, 0.0) if n else 0.0
            rows.append(
                {
                    "layer": layer,
                    "head": head,
                    "n_entries": int(n),
                    "n_queries": int(nq),
                    "mean_adv": mean,
                    "std_adv": math.sqrt(var),
                    "min_adv": s["min_adv"] if n else 0.0,
                    "max_adv": s["max_adv"] if n else 0.0,
                    "frac_positive": s["n_positive"] / n if n else 0.0,
                    "mass_positive": s["sum_mass_positive"] / nq if nq else 0.0,
                    "argmax_positive": s["n_argmax_positive"] / nq if nq else 0.0,
                    "alpha_weighted_adv": s["sum_alpha_adv"] / nq if nq else 0.0,
                    "mean_abs_alpha_weighted_adv": s["sum_abs_alpha_adv"] / nq if nq else 0.0,
                    "alpha_weighted_abs_adv": s["sum_alpha_abs_adv"] / nq if nq else 0.0,
                    "routing_top1_share": s["sum_top1_share"] / nr if nr else 0.0,
                    "routing_effective_keys": s["sum_effective_keys"] / nr if nr else 0.0,
                }
            )
            if layer in self.hist:
                hists[(layer, head)] = self.hist[layer][self.stats.heads[layer].index(head)].numpy()
        return AdvantageResult(rows=rows, histograms=hists, edges=HIST_EDGES.numpy())


def _amin_heads(t: Tensor) -> Tensor:
    return t.transpose(0, 1).reshape(t.shape[1], -1).amin(dim=1).double()


# ---------------------------------------------------------------------------------------------
# Convenience: verify over batches
# ---------------------------------------------------------------------------------------------


def verify_routing_law(
    model: nn.Module,
    batches: Tensor | Iterable[Tensor],
    *,
    objective: Objective | None = None,
    attention_mask: Tensor | None = None,
    layers: int | Iterable[int] | None = None,
    heads: int | Sequence[int] | Mapping[int, Sequence[int]] | None = None,
    advantage_stats: bool = True,
) -> tuple[RoutingLawResult, AdvantageResult | None]:
    """Verify the gradient laws (and optionally stream advantage statistics) over batches.

    Args:
        model: a TransformerLens model.
        batches: one token tensor ``[batch, pos]`` or an iterable of them.
        objective: scalar objective (default next-token loss).
        attention_mask: applied to a single batch only.

    Returns:
        ``(RoutingLawResult, AdvantageResult or None)``.
    """
    check = RoutingLawCheck()
    accs: list[Any] = [check]
    adv = AdvantageStats() if advantage_stats else None
    if adv is not None:
        accs.append(adv)
    if isinstance(batches, Tensor):
        batches = [batches]
    with capture(model, accumulators=accs, layers=layers, heads=heads, objective=objective) as cap:
        n = 0
        for batch in batches:
            cap.run(batch, attention_mask=attention_mask)
            n += 1
        if n == 0:
            raise InputError("no batches given; expected at least one token tensor")
    return check.finalize(), adv.finalize() if adv is not None else None


# ---------------------------------------------------------------------------------------------
# One-step check
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class OneStepResult:
    """Did one small gradient-descent step move attention toward positive-advantage keys?

    Per head: ``adv_weighted_dalpha``, the mean over queries of Σ_j A_ij Δα_ij, the headline
    test: a step on the scores themselves (Δs = η α A) gives Σ_j A_ij Δα_ij = η Σ_j α_ij² A_ij²
    ≥ 0 to first order (because Σ_j α_ij A_ij = 0), and Σ_j A_ij Δα_ij = −Σ_j b_ij Δα_ij is the
    first-order loss decrease through this head's attention, so positive means attention moved
    toward keys whose values help; ``frac_queries_toward_positive``, the share of queries (with
    more than one key) for which it is positive; ``gain_share_positive``, the share of the
    attention mass gained (Σ max(Δα, 0)) that went to keys with A > 0 (descriptive: even the pure
    law does not make every positive key gain, since Δα_ij ∝ α_ij(α_ij A_ij − Σ_k α_ik² A_ik));
    ``net_mass_to_positive``, the mean over queries of Σ_{A>0} Δα_ij;
    ``corr_ds_alpha_adv``, the Pearson correlation over unmasked entries between the α-centred
    score change Δs_ij − Σ_j α_ij Δs_ij (what moves α to first order) and α_ij A_ij (the change a
    step on the scores themselves would make). Parameter steps move scores through W_Q and W_K
    of every layer, so the correlation is positive but below 1.
    """

    lr: float
    scope: str
    loss_before: float
    loss_after: float
    rows: list[dict[str, Any]]

    def to_dataframe(self):
        import pandas as pd

        return pd.DataFrame(self.rows)

    def plot(self, ax=None):
        import matplotlib.pyplot as plt

        if ax is None:
            _, ax = plt.subplots(figsize=(6, 3))
        df = self.to_dataframe()
        x = np.arange(len(df))
        ax.bar(x, df["gain_share_positive"], label="share of gained mass on A>0 keys")
        ax.plot(x, df["corr_ds_alpha_adv"], "o", color="C1", label="corr(Δs centred, αA)")
        ax.axhline(0.5, color="grey", lw=0.8, ls="--")
        ax.set_xticks(x, [f"L{r.layer}H{r.head}" for r in df.itertuples()], rotation=90, fontsize=7)
        ax.set_ylim(-1, 1.05)
        ax.set_title(f"One gradient step (lr={self.lr:g})")
        ax.legend(fontsize=7)
        return ax


def _scores_and_patterns(model: nn.Module, inputs: Tensor, layers: list[int], **kw: Any) -> dict[str, Tensor]:
    names = {f"blocks.{layer}.attn.{h}" for layer in layers for h in ("hook_attn_scores", "hook_pattern")}
    store: dict[str, Tensor] = {}
    handles = []
    try:
        for name in names:
            handles.append(
                model.hook_dict[name].register_forward_hook(
                    lambda mod, inp, out, name=name: store.__setitem__(name, out.detach())
                )
            )
        with torch.no_grad():
            model(inputs, **kw)
    finally:
        for h in handles:
            h.remove()
    return store


def one_step_check(
    model: nn.Module,
    tokens: Tensor,
    *,
    lr: float = 1e-3,
    objective: Objective | None = None,
    attention_mask: Tensor | None = None,
    layers: int | Iterable[int] | None = None,
    heads: int | Sequence[int] | Mapping[int, Sequence[int]] | None = None,
    scope: str = "all",
) -> OneStepResult:
    """Take one gradient-descent step (lr) on a copy of ``model`` and see where attention moved.

    Args:
        scope: ``"all"`` steps every parameter (a real training step; score changes then also
            carry the indirect effect of earlier layers' updates on later layers' inputs), or
            ``"layer_qk"``, which steps only each layer's own W_Q, W_K, b_Q, b_K, one layer at a
            time, isolating the routing law: then Δs = η J Jᵀ(αA) to first order, whose inner
            product with αA is non-negative.

    The user's model is not modified (the steps are taken on a deep copy).
    """
    if scope not in ("all", "layer_qk"):
        raise ConfigError(f"scope must be 'all' or 'layer_qk', got {scope!r}")
    if not (isinstance(lr, int | float) and lr > 0 and math.isfinite(lr)):
        raise ConfigError(f"lr must be a positive finite number, got {lr!r}")
    with capture(model, keep=True, layers=layers, heads=heads, objective=objective) as cap:
        loss_before = cap.run(tokens, attention_mask=attention_mask)
        kept = cap.kept
        inputs, mask = cap._check_inputs(tokens, attention_mask)
        obj = objective or cap.objective
    sel = sorted(kept)
    kw = {"attention_mask": mask} if mask is not None else {}
    before = _scores_and_patterns(model, inputs, sel, **kw)
    if obj is None:
        from ..hooks.objectives import next_token_loss

        obj = next_token_loss(mask)
    stepped = copy.deepcopy(model)
    if scope == "all":
        groups = {None: [p for p in stepped.parameters() if torch.is_floating_point(p)]}
    else:
        groups = {layer: _qk_params(stepped, layer) for layer in sel}
    after: dict[str, Tensor] = {}
    losses = []
    for layer, params in groups.items():
        saved = [p.detach().clone() for p in params]
        for p in params:
            p.requires_grad_(True)
        with torch.enable_grad():
            loss = obj(stepped(inputs, **kw), inputs)
            grads = torch.autograd.grad(loss, params, allow_unused=True)
        with torch.no_grad():
            for p, g in zip(params, grads):
                if g is not None:
                    p.sub_(lr * g)
            losses.append(float(obj(stepped(inputs, **kw), inputs)))
        out = _scores_and_patterns(stepped, inputs, sel if layer is None else [layer], **kw)
        after.update(out)
        with torch.no_grad():
            for p, s0 in zip(params, saved):
                p.copy_(s0)
    loss_after = losses[0] if scope == "all" else float(np.mean(losses))
    del stepped
    rows = []
    for layer in sel:
        b = kept[layer]
        idx = torch.tensor(b.heads, device=b.pattern.device)
        s0 = before[f"blocks.{layer}.attn.hook_attn_scores"].index_select(1, idx)
        s1 = after[f"blocks.{layer}.attn.hook_attn_scores"].index_select(1, idx)
        a0 = b.pattern
        a1 = after[f"blocks.{layer}.attn.hook_pattern"].index_select(1, idx)
        mask_e = _entry_mask(b)
        adv = torch.where(mask_e, advantage(a0, torch.where(mask_e, b.grad_pattern, 0)), 0)
        ds = torch.where(mask_e, s1 - s0, 0)
        ds_c = torch.where(mask_e, ds - (a0 * ds).sum(-1, keepdim=True), 0)
        da = torch.where(mask_e, a1 - a0, 0)
        pos = (adv > 0) & mask_e
        gain = da.clamp(min=0)
        qv = b.query_valid[:, None, :].to(da.dtype)
        for i, head in enumerate(b.heads):
            m = mask_e[:, 0]
            x = ds_c[:, i][m].double()
            y = (a0[:, i] * adv[:, i])[m].double()
            gsum = float(gain[:, i].sum())
            adv_da = (adv[:, i] * da[:, i]).sum(-1)  # Σ_j A_ij Δα_ij per query
            qmask = b.query_valid & (mask_e[:, 0].sum(-1) > 1)  # rows with a choice to make
            nq = max(float(qmask.sum()), 1.0)
            rows.append(
                {
                    "layer": layer,
                    "head": head,
                    "gain_share_positive": float((gain[:, i] * pos[:, i]).sum()) / gsum if gsum > 0 else 0.0,
                    "net_mass_to_positive": float(((da[:, i] * pos[:, i]).sum(-1) * qv[:, 0]).sum() / qv.sum()),
                    "adv_weighted_dalpha": float((adv_da * qmask).sum()) / nq,
                    "frac_queries_toward_positive": float(((adv_da > 0) & qmask).sum()) / nq,
                    "corr_ds_alpha_adv": _pearson(x, y),
                    "mean_abs_dalpha": float(da[:, i].abs().sum() / max(float(m.sum()), 1)),
                }
            )
    return OneStepResult(lr=float(lr), scope=scope, loss_before=loss_before, loss_after=loss_after, rows=rows)


def _qk_params(model: nn.Module, layer: int) -> list[Tensor]:
    attn = model.get_submodule(f"blocks.{layer}.attn")
    names = ("W_Q", "W_K", "b_Q", "b_K", "_W_K", "_b_K")
    params = [p for n, p in attn.named_parameters(recurse=False) if n in names]
    if not params:
        raise InputError(f"layer {layer} has no W_Q/W_K parameters to step (scope='layer_qk')")
    return params


def _pearson(x: Tensor, y: Tensor) -> float:
    """Pearson correlation; 0.0 where either side is constant (no variation to correlate)."""
    if x.numel() < 2:
        return 0.0
    x = x - x.mean()
    y = y - y.mean()
    den = float(x.norm() * y.norm())
    return float((x * y).sum()) / den if den > 0 else 0.0
