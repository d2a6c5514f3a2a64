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
from collections.abc import Callable, Iterable, Mapping, Sequence
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


class _Zeroer:
    """Zeroes the masked entries of a tile in place, as cheaply as is safe.

    Multiplying by a 0/1 float mask is an order of magnitude faster on CPU than ``masked_fill_``
    with a broadcast mask, but keeps a NaN. Autograd leaves NaN only where a whole row is masked
    (softmax over no key); such rows exist only with padding, so layers with an invalid query row
    take ``masked_fill_``.
    """

    def __init__(self, b: LayerBundle, mask: Tensor) -> None:
        self.mask = mask
        self.fast = bool(b.query_valid.all())

    def tile(self, qs: slice, ks: slice, dtype: torch.dtype) -> Callable[[Tensor], Tensor]:
        m = self.mask[:, :, qs, ks]
        if self.fast:
            mf = m.to(dtype)
            return lambda x: x.mul_(mf)
        notm = ~m
        return lambda x: x.masked_fill_(notm, 0)


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
        alpha, u, v, gs, gp = b.pattern, b.grad_z, b.values, b.grad_scores, b.grad_pattern
        mask = _entry_mask(b)
        dims = (0, 2, 3)
        acc = _PerHead(len(b.heads), {"res_s": "max", "max_s": "max", "res_p": "max", "max_p": "max", "rowsum": "max"})
        u_h, v_h = u.transpose(1, 2).contiguous(), v.transpose(1, 2).contiguous()  # [batch, head, pos, d]
        zero = _Zeroer(b, mask)
        for hs, qs, ks in _tiles(alpha, b.valid):
            a, zm = alpha[:, hs, qs, ks], zero.tile(qs, ks, alpha.dtype)
            g_s, g_p = gs[:, hs, qs, ks], gp[:, hs, qs, ks]
            compat = torch.matmul(u_h[:, hs, qs], v_h[:, hs, ks].transpose(-1, -2))  # b = u·v, recomputed
            tmp = zm(torch.sub(g_p, compat).abs_())
            res_p = tmp.amax(dims)
            max_p = zm(torch.abs(g_p, out=tmp)).amax(dims)
            torch.mul(a, compat, out=tmp)
            bbar = tmp.sum(-1, keepdim=True)
            # ∂L/∂s and α(b − b̄) are both exactly 0 at masked keys (α = 0): no masking needed
            res_s = compat.sub_(bbar).mul_(a).sub_(g_s).abs_().amax(dims)  # |∂L/∂s − α(b − b̄)|
            max_s = torch.abs(g_s, out=tmp).amax(dims)
            rowsum = g_s.sum(-1).abs_().amax((0, 2))  # keys past the tile are masked: 0 there
            acc.add(hs, res_s=res_s, max_s=max_s, res_p=res_p, max_p=max_p, rowsum=rowsum)
            del compat, tmp
        cat = acc.v
        # ∂L/∂v_j = Σ_i α_ij u_i per query head, summed over each kv head's group.
        law_vq = torch.einsum("bhqk,bqhd->bkhd", alpha, u)
        kv = torch.tensor(b.kv_heads, device=law_vq.device)
        law_v = law_vq.new_zeros(b.grad_values.shape).index_add_(2, kv, law_vq)
        res_v_kv = law_v.sub_(b.grad_values).abs_().amax(dim=(0, 1, 3)).double()
        max_v_kv = b.grad_values.abs().amax(dim=(0, 1, 3)).double()
        complete = torch.tensor(b.group_complete, dtype=torch.float64)
        self.stats.add(
            b.layer,
            b.heads,
            max_abs_residual_dscores=cat["res_s"],
            max_abs_dscores=cat["max_s"],
            max_abs_rowsum_dscores=cat["rowsum"],
            max_abs_residual_dpattern=cat["res_p"],
            max_abs_dpattern=cat["max_p"],
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

# Histogram of A on the float32 grid itself: an entry's bin is its sign, exponent and two leading
# mantissa bits, i.e. the float32 bit pattern shifted right by 21. A bin spans a factor of at most
# 1.25 in |A| (< 0.1 decade), every float32 has one (nothing is clamped), and binning costs one
# integer shift instead of a logarithm. Counts are kept in code order (negative magnitudes first,
# smallest to largest, then positive ones) and put in ascending order of value by finalize().
_N_MAG = 1024  # magnitude codes: 8 exponent bits x 4 mantissa quarters
_NEG_FIRST = np.concatenate([np.arange(_N_MAG - 1, -1, -1), np.arange(_N_MAG, 2 * _N_MAG)])


def _magnitude_centres() -> np.ndarray:
    c = np.arange(_N_MAG)
    e, m = c >> 2, c & 3
    with np.errstate(over="ignore"):
        normal = 2.0 ** (e - 127.0) * np.sqrt((1 + m / 4) * (1 + (m + 1) / 4))  # geometric centre
    centres = np.where(e == 0, (m + 0.5) / 4 * 2.0**-126, normal)  # subnormals: linear quarters
    centres[e == 255] = np.inf  # infinities and NaNs
    return centres


#: the value each histogram bin stands for (ascending; 2048 bins, negatives first).
HIST_BIN_VALUES = np.concatenate([-_magnitude_centres()[::-1], _magnitude_centres()])


def _float_histogram(adv: Tensor, n_masked: int = 0) -> Tensor:
    """Counts per head ``[head, 2048]`` of the entries of ``adv``, in code order.

    ``adv`` holds +0 at its masked entries (``n_masked`` of them per head); they are taken out of
    the +0 bin, so an unmasked A that is exactly 0 is still counted.
    """
    n_h = adv.shape[1]
    x = adv if adv.dtype == torch.float32 else adv.float()
    idx = x.view(torch.int32) >> 21  # in [-1024, 1023]: negative floats have the sign bit set
    idx += torch.arange(n_h, device=adv.device, dtype=torch.int32)[None, :, None, None] * (2 * _N_MAG) + _N_MAG
    counts = torch.bincount(idx.flatten(), minlength=n_h * 2 * _N_MAG).view(n_h, 2 * _N_MAG)
    counts[:, _N_MAG] -= n_masked
    return counts


def _tiles(pattern: Tensor, valid: Tensor, budget: int = 1 << 20, q_blocks: int = 8) -> list[tuple[slice, slice, slice]]:
    """(heads, queries, keys) tiles covering every unmasked entry, at most about ``budget`` each.

    Queries are cut into ``q_blocks`` blocks (fewer when a block would hold under 16 queries,
    more when one would exceed the budget), and a block only reaches the last key any of its
    queries may attend to: under a causal mask the tiles cover (B+1)/(2B) of the square instead of
    all of it. Heads are grouped to fill the budget, so temporaries stay cache-sized.
    """
    b, n_h, q, k = pattern.shape
    qb = min(q, max(16, min(-(-q // q_blocks), budget // max(b * k, 1))))
    tiles = []
    for q0 in range(0, q, qb):
        q1 = min(q0 + qb, q)
        keys = valid[:, q0:q1].any(0).any(0).nonzero()
        k1 = int(keys[-1]) + 1 if keys.numel() else 1
        per = max(1, budget // max(b * (q1 - q0) * k1, 1))
        for h0 in range(0, n_h, per):
            tiles.append((slice(h0, min(h0 + per, n_h)), slice(q0, q1), slice(0, k1)))
    return tiles


def _f64_rows(x: Tensor) -> Tensor:
    """Sum of ``[batch, head, query]`` row results over batch and queries, in float64."""
    return x.sum((0, 2), dtype=torch.float64)


class _PerHead:
    """Per-head running reductions over tiles (sum / max / min)."""

    def __init__(self, n_h: int, kinds: dict[str, str]) -> None:
        init = {"sum": 0.0, "max": -float("inf"), "min": float("inf")}
        self.kinds = kinds
        self.v = {k: torch.full((n_h,), init[r], dtype=torch.float64) for k, r in kinds.items()}

    def add(self, hs: slice, **vals: Tensor) -> None:
        for k, x in vals.items():
            x = x.detach().to("cpu", torch.float64)
            cur = self.v[k][hs]
            r = self.kinds[k]
            self.v[k][hs] = cur + x if r == "sum" else torch.maximum(cur, x) if r == "max" else torch.minimum(cur, x)


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

    ``histograms[(layer, head)]`` counts the unmasked A_ij over the bins whose values are
    ``bin_values`` (ascending; the float32 grid with four bins per octave, see
    :data:`HIST_BIN_VALUES`); :meth:`quantile` reads them.
    """

    rows: list[dict[str, Any]]
    histograms: dict[tuple[int, int], np.ndarray]
    bin_values: np.ndarray

    def to_dataframe(self):
        import pandas as pd

        return pd.DataFrame(self.rows)

    def quantile(self, layer: int, head: int, q: float) -> float:
        """Approximate quantile of A for one head from its histogram: the centre of the bin that
        holds it, within a factor 1.25 of the exact value (bins of the float32 grid)."""
        if not 0 <= q <= 1:
            raise InputError(f"quantile q must lie in [0, 1], got {q}")
        if (layer, head) not in self.histograms:
            raise InputError(f"no histogram for layer {layer}, head {head}: the heads captured are "
                             f"{sorted(self.histograms)} (histograms need AdvantageStats(histogram=True))")
        cum = np.cumsum(self.histograms[(layer, head)])
        if cum[-1] == 0:
            raise InputError(f"layer {layer}, head {head} saw no unmasked entries; no quantile")
        rank = max(1, math.ceil(q * cum[-1]))  # the rank-th smallest entry, 1-based
        return float(self.bin_values[int(np.searchsorted(cum, rank))])

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
        mask = _entry_mask(b)
        zero = _Zeroer(b, mask)
        qvb = b.query_valid[:, None, :]
        qv = qvb.to(b.pattern.dtype)
        dims = (0, 2, 3)
        n_h = len(b.heads)
        kinds = {"n_positive": "sum", "sum_adv": "sum", "sum_adv_sq": "sum", "min_adv": "min", "max_adv": "max",
                 "sum_mass_positive": "sum", "sum_alpha_adv": "sum", "sum_abs_alpha_adv": "sum",
                 "sum_alpha_abs_adv": "sum", "n_argmax_positive": "sum", "n_routing_queries": "sum",
                 "sum_top1_share": "sum", "sum_effective_keys": "sum"}
        acc = _PerHead(n_h, kinds)
        hist = torch.zeros(n_h, 2 * _N_MAG, dtype=torch.float64)
        for hs, qs, ks in _tiles(b.pattern, b.valid):
            a, gp = b.pattern[:, hs, qs, ks], b.grad_pattern[:, hs, qs, ks]
            q_v, q_vb = qv[:, :, qs], qvb[:, :, qs]
            adv = torch.mul(a, gp)
            bbar = adv.sum(-1, keepdim=True)
            # A on valid entries, +0 elsewhere (adding 0 turns the −0 of a float mask into +0)
            zero.tile(qs, ks, adv.dtype)(torch.sub(bbar, gp, out=adv)).add_(0.0)
            # float indicators and products rather than boolean masks and torch.where, which are
            # several times slower on CPU: pos = 1.0 where A > 0, else 0.0
            pos = torch.sign(adv).clamp_(min=0)
            wp = torch.mul(a, pos)  # attention on positive-advantage keys
            aa = torch.mul(a, adv)
            alpha_adv = aa.sum(-1)
            # Per-row reductions first, in the tensors' dtype; only the [batch, head, query] row
            # results are summed in float64 (converting whole tiles would cost a copy each).
            # Σ_j α_ij A_ij = 0 on every valid row, so A takes both signs there: the zeros at masked
            # entries cannot change the min or the max.
            vals = dict(
                n_positive=_f64_rows(pos.sum(-1)),
                sum_adv=_f64_rows(adv.sum(-1)),
                sum_adv_sq=_f64_rows(torch.linalg.vector_norm(adv, dim=-1).square_()),
                min_adv=adv.amin(dims),
                max_adv=adv.amax(dims),
                sum_mass_positive=_f64_rows(wp.sum(-1) * q_v),
                # a most-attended key of the row has A > 0 (any of them, under exact ties)
                n_argmax_positive=(((wmax := wp.amax(-1)) >= a.amax(-1)) & (wmax > 0) & q_vb).sum((0, 2)),
                sum_alpha_adv=_f64_rows(alpha_adv * q_v),
                sum_abs_alpha_adv=_f64_rows(alpha_adv.abs() * q_v),
                sum_alpha_abs_adv=_f64_rows(aa.abs_().sum(-1) * q_v),
            )
            if self.histogram:
                n_masked = mask[:, :, qs, ks].numel() - int(mask[:, :, qs, ks].sum())
                hist[hs] += _float_histogram(adv, n_masked).cpu().double()
            del pos, wp
            g = torch.abs(b.grad_scores[:, hs, qs, ks], out=adv)
            tot = g.sum(-1)
            live = (tot > 0) & q_vb
            safe = torch.where(tot > 0, tot, 1)
            # entropy of p = g / tot: log tot − Σ g log g / tot (g = 0 adds 0: log of a clamped g)
            glogg = torch.clamp(g, min=torch.finfo(g.dtype).tiny, out=aa).log_().mul_(g).sum(-1)
            ent = safe.log() - glogg / safe
            vals.update(
                n_routing_queries=live.sum((0, 2)),
                sum_top1_share=_f64_rows(torch.where(live, g.amax(-1) / safe, 0)),
                sum_effective_keys=_f64_rows(torch.where(live, ent.exp(), 0)),
            )
            acc.add(hs, **vals)
            del adv, aa, g
        cat = acc.v
        self.stats.add(
            b.layer,
            b.heads,
            n_entries=mask.sum(dims).expand(n_h),
            n_queries=qv.sum().expand(n_h),
            **cat,
        )
        if self.histogram:
            self.hist[b.layer] = self.hist[b.layer] + hist if b.layer in self.hist else hist

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
                h = self.hist[layer][self.stats.heads[layer].index(head)].numpy()
                hists[(layer, head)] = h[_NEG_FIRST]
        return AdvantageResult(rows=rows, histograms=hists, bin_values=HIST_BIN_VALUES)


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
