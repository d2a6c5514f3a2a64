"""Mergeable per-(layer, head) running statistics, the storage behind streaming accumulators.

Each statistic is a float64 vector over a layer's selected heads with a reduction: ``sum``,
``max`` or ``min``. Two tables merge entry by entry, so a dataset processed in batches, or split
across processes, gives the same result as one pass.

The tiled reductions the [batch, head, query, key] accumulators share live here too
(:func:`tiles`, :class:`PerHead`, :class:`Zeroer`): they keep temporaries cache-sized and skip the
entries a causal mask leaves empty.
"""

from collections.abc import Callable, Iterator

import torch
from torch import Tensor

from ..errors import InputError
from ..hooks.bundle import LayerBundle

__all__ = ["HeadStats"]

_REDUCE = {"sum": torch.add, "max": torch.maximum, "min": torch.minimum}


class HeadStats:
    """A table ``layer -> {name: Float64[head]}`` with a fixed reduction per name."""

    def __init__(self, kinds: dict[str, str]) -> None:
        bad = {k: v for k, v in kinds.items() if v not in _REDUCE}
        if bad:
            raise InputError(f"unknown reductions {bad}; accepted: {sorted(_REDUCE)}")
        self.kinds = dict(kinds)
        self.heads: dict[int, list[int]] = {}
        self.data: dict[int, dict[str, Tensor]] = {}

    def add(self, layer: int, heads: list[int], **values: Tensor) -> None:
        """Fold per-head values (any shape ``[head]``) for ``layer`` into the table."""
        if layer in self.heads and self.heads[layer] != heads:
            raise InputError(f"layer {layer}: heads {heads} differ from the heads seen before {self.heads[layer]}")
        self.heads[layer] = list(heads)
        row = self.data.setdefault(layer, {})
        for name, v in values.items():
            v = v.detach().to("cpu", torch.float64)
            row[name] = _REDUCE[self.kinds[name]](row[name], v) if name in row else v.clone()

    def merge(self, other: "HeadStats") -> "HeadStats":
        """Combine ``other`` into this table (in place) and return it."""
        if other.kinds != self.kinds:
            raise InputError("cannot merge statistics of different kinds")
        for layer, row in other.data.items():
            self.add(layer, other.heads[layer], **row)
        return self

    def rows(self) -> Iterator[tuple[int, int, dict[str, float]]]:
        """Yield ``(layer, head, {name: value})`` in layer then head order."""
        for layer in sorted(self.data):
            row = self.data[layer]
            for i, head in enumerate(self.heads[layer]):
                yield layer, head, {k: float(v[i]) for k, v in row.items()}

    def __bool__(self) -> bool:
        return bool(self.data)


# ---------------------------------------------------------------------------------------------
# Tiled per-head reductions over [batch, head, query, key] tensors
# ---------------------------------------------------------------------------------------------


def entry_mask(b: LayerBundle) -> Tensor:
    """Bool[batch, 1, query_pos, key_pos]: valid entries of valid query rows."""
    return (b.valid & b.query_valid[:, :, None])[:, None]


def tiles(pattern: Tensor, valid: Tensor, budget: int = 1 << 20, q_blocks: int = 8) -> list[tuple[slice, slice, slice]]:
    """(heads, queries, keys) tiles covering every unmasked entry, at most about ``budget`` each.

    Queries are cut into ``q_blocks`` blocks (fewer when a block would hold under 16 queries,
    more when one would exceed the budget), and a block only reaches the last key any of its
    queries may attend to: under a causal mask the tiles cover (B+1)/(2B) of the square instead of
    all of it. Heads are grouped to fill the budget, so temporaries stay cache-sized.
    """
    b, n_h, q, k = pattern.shape
    qb = min(q, max(16, min(-(-q // q_blocks), budget // max(b * k, 1))))
    out = []
    for q0 in range(0, q, qb):
        q1 = min(q0 + qb, q)
        keys = valid[:, q0:q1].any(0).any(0).nonzero()
        k1 = int(keys[-1]) + 1 if keys.numel() else 1
        per = max(1, budget // max(b * (q1 - q0) * k1, 1))
        for h0 in range(0, n_h, per):
            out.append((slice(h0, min(h0 + per, n_h)), slice(q0, q1), slice(0, k1)))
    return out


def f64_rows(x: Tensor) -> Tensor:
    """Sum of ``[batch, head, query]`` row results over batch and queries, in float64."""
    return x.sum((0, 2), dtype=torch.float64)


class Zeroer:
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


class PerHead:
    """Per-head running reductions over the tiles of one layer (sum / max / min), float64 on CPU."""

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
