"""The measurements a corpus scan can stream, each a library accumulator on the capture engine.

=================  ==========================================================================
name               accumulator and what it contributes per head
=================  ==========================================================================
``routing``        :class:`~bayesmanifold.analyses.RoutingLawCheck`: the routing/value/
                   compatibility laws against autograd (residuals are maxima over the corpus)
``advantage``      :class:`~bayesmanifold.analyses.AdvantageStats`: distribution of the
                   advantage A_ij, attention mass on A > 0, routing-gradient concentration
``entropy``        :class:`~bayesmanifold.analyses.AttentionEntropyAccumulator`: mean attention
                   entropy (nats) over every real query position
``value_norms``    :class:`ValueUpdateNorms`: size of the value update ‖Σ_i α_ij u_i‖ per key
``specialization`` :class:`~bayesmanifold.analyses.SpecializationAccumulator` over 4 query
                   position buckets (on request)
``manifold``       :class:`ValueManifoldHeads`: streaming PCA of each head's value vectors
                   (on request)
=================  ==========================================================================

Every state is sums, maxima, counts and fixed-size histograms or moment matrices: memory does
not grow with the number of tokens.
"""

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..analyses import (
    AdvantageStats,
    AttentionEntropyAccumulator,
    HeadStats,
    ManifoldAccumulator,
    RoutingLawCheck,
    SpecializationAccumulator,
)
from ..analyses.registry import scan_names
from ..analyses.routing_law import value_updates
from ..errors import ConfigError, InputError
from ..hooks.bundle import LayerBundle

__all__ = ["MEASURES", "DEFAULT_MEASURES", "ModelShape", "ValueUpdateNorms", "ValueManifoldHeads", "check_measures"]

N_POSITION_GROUPS = 4


@dataclass(frozen=True)
class ModelShape:
    """What the accumulators are built from (kept in a scan's identity, so a merge can rebuild them)."""

    n_layers: int
    n_heads: int
    n_kv_heads: int
    d_head: int
    layers: tuple[int, ...]

    def to_dict(self) -> dict[str, Any]:
        return {"n_layers": self.n_layers, "n_heads": self.n_heads, "n_kv_heads": self.n_kv_heads,
                "d_head": self.d_head, "layers": list(self.layers)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelShape":
        return cls(**{**d, "layers": tuple(d["layers"])})


class ValueUpdateNorms:
    """Accumulator: the size of each value's gradient update ‖Σ_i α_ij u_i‖ per head, and ‖v_j‖.

    Σ_i α_ij u_i is ∂L/∂v_j of one query head (Paper II's value law; PAPERS.md §1): without GQA it
    is read from autograd's value gradient; a kv head shared by a group sums its query heads, so
    there each query head's update is formed from α and u (:func:`~bayesmanifold.analyses.routing_law.value_updates`,
    tiled over the keys each query may see, and shared with the routing check). Counted over real key positions.
    """

    _KINDS = {"n_keys": "sum", "sum_norm": "sum", "sum_norm_sq": "sum", "max_norm": "max", "sum_value_norm": "sum"}

    def __init__(self) -> None:
        self.stats = HeadStats(self._KINDS)

    def update(self, b: LayerBundle) -> None:
        if b.grad_values is None:
            raise InputError("ValueUpdateNorms needs the backward pass (a capture with gradients)")
        if b.n_heads == b.n_kv_heads:
            g = b.grad_values if b.kv_heads == list(range(b.n_kv_heads)) else b.grad_values[:, :, b.kv_heads]
        else:  # formed once per bundle, shared with RoutingLawCheck
            g = value_updates(b).permute(0, 3, 1, 2)  # [batch, key, head, d]
        acc = torch.float64 if g.dtype == torch.float64 else torch.float32
        norm = torch.linalg.vector_norm(g, dim=-1, dtype=acc).double()  # [batch, key, head]
        vnorm = torch.linalg.vector_norm(b.values, dim=-1, dtype=acc).double()
        keys = b.valid.any(1)  # [batch, key]: keys some real query attends to
        if b.batch is not None and b.batch.attention_mask is not None:
            keys = keys & b.batch.attention_mask.bool()
        k = keys[:, :, None].to(norm.dtype)
        n_h = len(b.heads)
        self.stats.add(
            b.layer,
            list(b.heads),
            n_keys=k.sum().expand(n_h),
            sum_norm=(norm * k).sum((0, 1)),
            sum_norm_sq=(norm.square() * k).sum((0, 1)),
            max_norm=(norm * k).amax((0, 1)),
            sum_value_norm=(vnorm * k).sum((0, 1)),
        )

    def merge(self, other: "ValueUpdateNorms") -> "ValueUpdateNorms":
        self.stats.merge(other.stats)
        return self

    def finalize(self) -> list[dict[str, Any]]:
        if not self.stats:
            raise InputError("ValueUpdateNorms saw no layer: run capture with it before finalize()")
        rows = []
        for layer, head, s in self.stats.rows():
            n = s["n_keys"]
            rows.append({
                "layer": layer,
                "head": head,
                "value_update_norm_mean": s["sum_norm"] / n if n else float("nan"),
                "value_update_norm_rms": float(np.sqrt(s["sum_norm_sq"] / n)) if n else float("nan"),
                "value_update_norm_max": s["max_norm"] if n else float("nan"),
                "value_norm_mean": s["sum_value_norm"] / n if n else float("nan"),
            })
        return rows


class ValueManifoldHeads:
    """Accumulator: a streaming PCA (:class:`~bayesmanifold.analyses.ManifoldAccumulator`, moments
    only) of each head's value vectors v_j at the real key positions; forward-only."""

    needs_gradients = False

    def __init__(self) -> None:
        self.pcas: dict[tuple[int, int], ManifoldAccumulator] = {}

    def update(self, b: LayerBundle) -> None:
        keys = torch.ones(b.values.shape[:2], dtype=torch.bool, device=b.values.device)
        if b.batch is not None and b.batch.attention_mask is not None:
            keys = b.batch.attention_mask.bool()
        v = b.values[keys]  # [n, head, d]
        for i, head in enumerate(b.heads):
            pca = self.pcas.setdefault((b.layer, head), ManifoldAccumulator(standardize=True, keep_samples=False, feature_kind="values"))
            pca.update(v[:, i])

    def merge(self, other: "ValueManifoldHeads") -> "ValueManifoldHeads":
        for key, pca in other.pcas.items():
            if key in self.pcas:
                self.pcas[key].merge(pca)
            else:
                self.pcas[key] = ManifoldAccumulator(standardize=True, keep_samples=False, feature_kind="values").merge(pca)
        return self

    def finalize(self) -> list[dict[str, Any]]:
        import warnings

        rows = []
        for (layer, head), pca in sorted(self.pcas.items()):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # rank-limited PCAs are flagged in the row instead
                try:
                    r = pca.finalize()
                    vals = (r.pc1_share, r.pc12_share, r.participation_ratio, bool(r.rank_limited))
                except InputError:  # constant or too few values
                    vals = (float("nan"), float("nan"), float("nan"), True)
            rows.append(dict(zip(("layer", "head", "value_pc1_share", "value_pc12_share", "value_participation_ratio",
                                  "value_pca_rank_limited"), (layer, head, *vals))))
        return rows


def position_groups(batch: int, seq_len: int) -> torch.Tensor:
    """Query-position buckets ``[batch, seq_len]``: 4 equal buckets over each window."""
    g = torch.clamp(torch.arange(seq_len) * N_POSITION_GROUPS // seq_len, max=N_POSITION_GROUPS - 1)
    return g.expand(batch, seq_len)


# ------------------------------------------------------------------------------------ registry
def _routing_rows(res: Any) -> list[dict]:
    keep = ("rel_residual_dscores", "rel_residual_dvalues", "rel_residual_dpattern", "max_abs_dscores", "tested", "holds")
    return [{"layer": r["layer"], "head": r["head"], **{("routing_law_holds" if k == "holds" else
             "routing_law_tested" if k == "tested" else k): r[k] for k in keep}} for r in res.rows]


def _routing_summary(res: Any) -> dict:
    return {k: v for k, v in res.to_dict().items() if k != "heads"}


def _advantage_rows(res: Any) -> list[dict]:
    rows = []
    for r in res.rows:
        q = {}
        for name, p in (("adv_q05", 0.05), ("adv_median", 0.5), ("adv_q95", 0.95)):
            q[name] = res.quantile(r["layer"], r["head"], p) if r["n_entries"] else float("nan")
        rows.append({**r, **q})
    return rows


def _entropy_rows(res: Any) -> list[dict]:
    return [{"layer": layer, "head": h, "attention_entropy": float(res.per_head[i, h])}
            for i, layer in enumerate(res.layers) for h in range(res.per_head.shape[1])]


def _entropy_summary(res: Any) -> dict:
    return {"per_layer": res.per_layer.tolist(), "reduction_first_to_last": res.reduction, "n_queries": res.n_queries}


def _spec_rows(res: Any) -> list[dict]:
    return [{"layer": r["layer"], "head": r["head"], **{f"spec_{k}": v for k, v in r.items() if k not in ("layer", "head")}}
            for r in res.to_dataframe().to_dict("records")]


@dataclass(frozen=True)
class Measure:
    name: str
    help: str
    make: Callable[[ModelShape], Any]
    rows: Callable[[Any], list[dict]]
    summary: Callable[[Any], dict]
    labels: bool = False  # needs the position-group label


def _none(res: Any) -> dict:
    return {}


# How each streaming measurement becomes per-head rows and a summary (the registry says which exist).
_ADAPTERS: dict[str, Measure] = {m.name: m for m in (
    Measure("routing", "routing, value and compatibility laws against autograd",
            lambda s: RoutingLawCheck(), _routing_rows, _routing_summary),
    Measure("advantage", "advantage statistics and routing-gradient concentration",
            lambda s: AdvantageStats(histogram=True), _advantage_rows, _none),
    Measure("entropy", "attention entropy at every real query position",
            lambda s: AttentionEntropyAccumulator(list(s.layers), s.n_heads), _entropy_rows, _entropy_summary),
    Measure("value_norms", "value-update norms ‖Σ_i α_ij u_i‖ and value norms",
            lambda s: ValueUpdateNorms(), lambda r: r, _none),
    Measure("specialization", f"value specialization over {N_POSITION_GROUPS} query-position buckets",
            lambda s: SpecializationAccumulator(list(s.layers), s.n_heads, N_POSITION_GROUPS),
            _spec_rows, _none, labels=True),
    Measure("manifold", "streaming PCA of each head's value vectors",
            lambda s: ValueManifoldHeads(), lambda r: r, _none),
)}

#: The measurements a scan can stream, in the registry's order (:mod:`bayesmanifold.analyses.registry`).
MEASURES: dict[str, Measure] = {name: _ADAPTERS[name] for name in scan_names()}

DEFAULT_MEASURES = ("routing", "advantage", "entropy", "value_norms")


def check_measures(names: Any) -> tuple[str, ...]:
    """Measure names, checked and in registry order (duplicates dropped)."""
    if isinstance(names, str):
        names = [n.strip() for n in names.split(",") if n.strip()]
    names = list(names)
    if not names:
        raise ConfigError(f"no measures chosen; accepted: {', '.join(MEASURES)}")
    bad = [n for n in names if n not in MEASURES]
    if bad:
        raise ConfigError(f"unknown measures {bad}; accepted: {', '.join(MEASURES)}")
    return tuple(n for n in MEASURES if n in names)
