"""Advantage statistics: how each head's attention sits on keys with positive advantage.

Paper II (arXiv 2512.22473, §3; PAPERS.md §1): with b_ij = u_i·v_j = ∂L/∂α_ij and
b̄_i = Σ_j α_ij b_ij, the advantage of key j for query i is A_ij = −(b_ij − b̄_i). Gradient descent
moves s_ij by +η α_ij A_ij, so attention grows on keys whose value points along −u_i.

:class:`AdvantageStats` streams, per head, the distribution of A on unmasked entries (moments,
extremes and a histogram on the float32 grid), the attention mass on positive-advantage keys, the
α-weighted advantage and the concentration of the routing gradient |∂L/∂s| per query. It reads b
from autograd's ∂L/∂α (no recomputation) and works tile by tile (see ``headstats.tiles``): one
fused pass per row through :mod:`bayesmanifold.kernels` where they apply (float32 on the CPU),
else float-mask products and a bit-shift histogram in PyTorch. Both are benchmarked, keep them so.

Undefined figures are NaN, never 0: a head that saw no unmasked entry has no mean advantage, and
``routing_top1_share`` / ``routing_effective_keys`` are NaN where no query had a routing gradient
(e.g. an objective that does not depend on the head).
"""

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor

from .. import kernels
from ..errors import InputError
from ..hooks.bundle import LayerBundle
from .headstats import (
    HeadStats,
    RowBuffers,
    Scratch,
    entry_mask,
    f64_rows,
    kernel_choice,
    layer_tiles,
    n_entries,
    use_kernels,
    zeroer,
)

__all__ = ["AdvantageStats", "AdvantageResult", "HIST_BIN_VALUES", "advantage"]


def advantage(
    pattern: Float[Tensor, "... query_pos key_pos"], compat: Float[Tensor, "... query_pos key_pos"]
) -> Float[Tensor, "... query_pos key_pos"]:
    """A_ij = −(b_ij − b̄_i) with b̄_i = Σ_j α_ij b_ij; shapes ``[..., query_pos, key_pos]``."""
    return (pattern * compat).sum(-1, keepdim=True) - compat



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


def _float_histogram(adv: Tensor, n_masked: int = 0, out: Tensor | None = None) -> Tensor:
    """Counts per head ``[head, 2048]`` of the entries of ``adv``, in code order.

    ``adv`` holds +0 at its masked entries (``n_masked`` of them per head); they are taken out of
    the +0 bin, so an unmasked A that is exactly 0 is still counted. ``out``: an int32 buffer of
    ``adv``'s shape for the codes.
    """
    n_h = adv.shape[1]
    x = adv if adv.dtype == torch.float32 else adv.float()
    # in [-1024, 1023]: negative floats have the sign bit set
    idx = torch.bitwise_right_shift(x.view(torch.int32), 21, out=out)
    idx += torch.arange(n_h, device=adv.device, dtype=torch.int32)[None, :, None, None] * (2 * _N_MAG) + _N_MAG
    counts = torch.bincount(idx.flatten(), minlength=n_h * 2 * _N_MAG).view(n_h, 2 * _N_MAG)
    counts[:, _N_MAG] -= n_masked
    return counts


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
    |∂L/∂s_i·| is per query (share of the largest entry; exp of its entropy), over the
    ``n_routing_queries`` queries with a non-zero routing gradient. A figure with nothing to
    average (no unmasked entry, no query, no routing gradient) is NaN, not 0.

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

    def to_dict(self) -> dict[str, Any]:
        """JSON form: one object per head, and each histogram sparsely as the indices of its
        non-empty bins into :data:`HIST_BIN_VALUES` (``n_bins`` of them) with their counts."""
        hists = []
        for (layer, head), h in sorted(self.histograms.items()):
            nz = np.flatnonzero(h)
            hists.append({"layer": layer, "head": head, "bins": nz.tolist(), "counts": [float(c) for c in h[nz]]})
        return {"heads": [dict(r) for r in self.rows], "n_bins": int(len(self.bin_values)), "histograms": hists}

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

    Args:
        histogram: keep each head's histogram of A (for :meth:`AdvantageResult.quantile`).
        kernel: ``"auto"`` (the fused C kernels where built and applicable) or ``"torch"``.
    """

    def __init__(self, *, histogram: bool = True, kernel: str = "auto") -> None:
        self.histogram = histogram
        self.kernel = kernel_choice(kernel)
        self.stats = HeadStats(_ADV_KINDS)
        self.hist: dict[int, Tensor] = {}

    def update(self, b: LayerBundle) -> None:
        mask = entry_mask(b)
        qvb = b.query_valid[:, None, :]
        qv = qvb.to(b.pattern.dtype)
        n_h = len(b.heads)
        rows = RowBuffers(list(kernels.ADVANTAGE_ROWS), b.pattern)
        hist = torch.zeros(n_h, 2 * _N_MAG, dtype=torch.float64)
        if use_kernels(self.kernel, b.pattern, b.grad_pattern, b.grad_scores):
            for hs, qs, ks in layer_tiles(b):
                counts = torch.zeros(hs.stop - hs.start, 2 * _N_MAG, dtype=torch.int64) if self.histogram else None
                kernels.advantage_rows(b.pattern, b.grad_pattern, b.grad_scores, mask, (hs, qs, ks), rows.t, counts)
                if counts is not None:
                    hist[hs] += counts.double()
        else:
            self._tiles(b, rows, hist)
        alpha_adv, tot = rows["alpha_adv"], rows["tot"]
        live = (tot > 0) & qvb
        safe = torch.where(tot > 0, tot, 1)
        # entropy of p = g / tot: log tot − ln 2 · Σ g log2 g / tot
        ent = safe.log() - rows["glogg"] * (math.log(2.0) / safe)
        wmax = rows["wmax"]
        self.stats.add(
            b.layer,
            b.heads,
            n_entries=n_entries(b).expand(n_h),
            n_queries=qv.sum().expand(n_h),
            min_adv=rows["min_adv"].amin((0, 2)),
            max_adv=rows["max_adv"].amax((0, 2)),
            n_positive=f64_rows(rows["n_positive"]),
            sum_adv=f64_rows(rows["sum_adv"]),
            sum_adv_sq=f64_rows(rows["sum_adv_sq"]),
            sum_mass_positive=f64_rows(rows["mass"] * qv),
            # a most-attended key of the row has A > 0 (any of them, under exact ties)
            n_argmax_positive=((wmax >= rows["amax"]) & (wmax > 0) & qvb).sum((0, 2)),
            sum_alpha_adv=f64_rows(alpha_adv * qv),
            sum_abs_alpha_adv=f64_rows(alpha_adv.abs() * qv),
            # Σ_j α_ij |A_ij| = 2 Σ_j α_ij A_ij [A_ij > 0] − Σ_j α_ij A_ij
            sum_alpha_abs_adv=f64_rows((2 * rows["alpha_pos_adv"] - alpha_adv) * qv),
            n_routing_queries=live.sum((0, 2)),
            sum_top1_share=f64_rows(torch.where(live, rows["gmax"] / safe, 0)),
            sum_effective_keys=f64_rows(torch.where(live, ent.exp(), 0)),
        )
        if self.histogram:
            self.hist[b.layer] = self.hist[b.layer] + hist if b.layer in self.hist else hist

    def _tiles(self, b: LayerBundle, rows: RowBuffers, hist: Tensor) -> None:
        """The PyTorch path: the rows of :data:`~bayesmanifold.kernels.ADVANTAGE_ROWS`, tile by tile."""
        zero = zeroer(b)
        tile_list = layer_tiles(b)
        scratch = Scratch(b.pattern, tile_list, 2)
        codes = Scratch(b.pattern, tile_list, 1, torch.int32) if self.histogram else None
        for hs, qs, ks in tile_list:
            a, gp = b.pattern[:, hs, qs, ks], b.grad_pattern[:, hs, qs, ks]
            adv, pos = scratch.get(0, a.shape), scratch.get(1, a.shape)
            torch.mul(a, gp, out=adv)
            bbar = adv.sum(-1, keepdim=True)
            # A on valid entries, +0 elsewhere
            zero.tile(qs, ks, adv.dtype)(torch.sub(bbar, gp, out=adv))
            # float indicators and products rather than boolean masks and torch.where, which are
            # several times slower on CPU: pos = 1.0 where A > 0, else 0.0
            torch.gt(adv, 0, out=pos)
            # Per-row reductions in the tensors' dtype, into [batch, head, query] buffers summed in
            # float64 once per layer (converting whole tiles would cost a copy each). Σ_j α_ij A_ij = 0
            # on every valid row, so A takes both signs there: the zeros at masked entries cannot
            # change the min or the max.
            torch.sum(pos, -1, out=rows.at("n_positive", hs, qs))
            torch.sum(adv, -1, out=rows.at("sum_adv", hs, qs))
            torch.linalg.vector_norm(adv, dim=-1, out=rows.at("sum_adv_sq", hs, qs))  # squared after the loop
            torch.amin(adv, -1, out=rows.at("min_adv", hs, qs))
            torch.amax(adv, -1, out=rows.at("max_adv", hs, qs))
            if codes is not None:
                hist[hs] += _float_histogram(adv, zero.n_masked(qs, ks), codes.get(0, a.shape)).cpu().double()
            wp = pos.mul_(a)  # attention on positive-advantage keys
            torch.sum(wp, -1, out=rows.at("mass", hs, qs))
            torch.amax(wp, -1, out=rows.at("wmax", hs, qs))
            torch.amax(a, -1, out=rows.at("amax", hs, qs))
            torch.sum(wp.mul_(adv), -1, out=rows.at("alpha_pos_adv", hs, qs))  # Σ_j α_ij A_ij [A_ij > 0]
            torch.sum(adv.mul_(a), -1, out=rows.at("alpha_adv", hs, qs))
            # |∂L/∂s_i·| per row: its total, largest entry and Σ g log2 g (g = 0 adds 0: log of a
            # clamped g; log2 costs about 60 % of log on CPU)
            g = torch.abs(b.grad_scores[:, hs, qs, ks], out=adv)
            torch.sum(g, -1, out=rows.at("tot", hs, qs))
            torch.amax(g, -1, out=rows.at("gmax", hs, qs))
            glogg = torch.clamp(g, min=torch.finfo(g.dtype).tiny, out=pos).log2_().mul_(g)
            torch.sum(glogg, -1, out=rows.at("glogg", hs, qs))
        rows["sum_adv_sq"].square_()  # the kernels write the sum of squares

    def merge(self, other: "AdvantageStats") -> "AdvantageStats":
        self.stats.merge(other.stats)
        for layer, h in other.hist.items():
            self.hist[layer] = self.hist[layer] + h if layer in self.hist else h.clone()
        return self

    def finalize(self) -> AdvantageResult:
        if not self.stats:
            raise InputError("AdvantageStats saw no layer: run capture with it before finalize()")
        rows, hists = [], {}
        nan = float("nan")
        for layer, head, s in self.stats.rows():
            n, nq, nr = s["n_entries"], s["n_queries"], s["n_routing_queries"]
            mean = s["sum_adv"] / n if n else nan
            var = max(s["sum_adv_sq"] / n - mean**2, 0.0) if n else nan
            rows.append(
                {
                    "layer": layer,
                    "head": head,
                    "n_entries": int(n),
                    "n_queries": int(nq),
                    "mean_adv": mean,
                    "std_adv": math.sqrt(var),
                    "min_adv": s["min_adv"] if n else nan,
                    "max_adv": s["max_adv"] if n else nan,
                    "frac_positive": s["n_positive"] / n if n else nan,
                    "mass_positive": s["sum_mass_positive"] / nq if nq else nan,
                    "argmax_positive": s["n_argmax_positive"] / nq if nq else nan,
                    "alpha_weighted_adv": s["sum_alpha_adv"] / nq if nq else nan,
                    "mean_abs_alpha_weighted_adv": s["sum_abs_alpha_adv"] / nq if nq else nan,
                    "alpha_weighted_abs_adv": s["sum_alpha_abs_adv"] / nq if nq else nan,
                    "n_routing_queries": int(nr),
                    "routing_top1_share": s["sum_top1_share"] / nr if nr else nan,
                    "routing_effective_keys": s["sum_effective_keys"] / nr if nr else nan,
                }
            )
            if layer in self.hist:
                h = self.hist[layer][self.stats.heads[layer].index(head)].numpy()
                hists[(layer, head)] = h[_NEG_FIRST]
        return AdvantageResult(rows=rows, histograms=hists, bin_values=HIST_BIN_VALUES)
