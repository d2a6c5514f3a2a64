"""Mergeable per-(layer, head) running statistics, the storage behind streaming accumulators.

Each statistic is a float64 vector over a layer's selected heads with a reduction: ``sum``,
``max`` or ``min``. Two tables merge entry by entry, so a dataset processed in batches, or split
across processes, gives the same result as one pass.

The tiled reductions the [batch, head, query, key] accumulators share live here too
(:func:`tiles`, :class:`Zeroer`, :class:`Scratch`, :class:`RowBuffers`): they keep
temporaries cache-sized and reused, skip the entries a causal mask leaves empty, and are derived
once per pass and mask, shared by every accumulator and layer that reads them; the choice between
the fused C kernels and the PyTorch path (:func:`use_kernels`).
"""

import math
import weakref
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor

from .. import kernels
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


def _derived(b: LayerBundle, name: str, make: Callable[[], Any]) -> Any:
    """What ``make`` derives from a bundle's masks, made once per bundle and shared by the
    accumulators it is handed to (a bundle given new masks, or a :meth:`~LayerBundle.sliced` copy,
    derives its own)."""
    memo = b.__dict__.setdefault("_derived", {})
    got = memo.get(name)
    if got is None or got[0] is not b.valid or got[1] is not b.query_valid or got[2] != b.pattern.shape:
        got = memo[name] = (b.valid, b.query_valid, b.pattern.shape, make())
    return got[3]


_MASK_MEMO: dict[int, dict[tuple[str, tuple[int, ...]], tuple[Tensor, Any]]] = {}


def _mask_derived(b: LayerBundle, name: str, make: Callable[[], Any]) -> Any:
    """What ``make`` derives from a bundle's masks and pattern shape alone, shared by every bundle
    that holds the same mask tensors: capture hands the layers of one pass the same ``valid`` and
    ``query_valid`` objects where their masks are equal, so masks, tiles and counts are made once
    per pass. Entries live as long as the ``valid`` tensor."""
    key = id(b.valid)
    memo = _MASK_MEMO.get(key)
    if memo is None:
        memo = _MASK_MEMO[key] = {}
        weakref.finalize(b.valid, _MASK_MEMO.pop, key, None)
    got = memo.get((name, tuple(b.pattern.shape)))
    if got is None or got[0] is not b.query_valid:
        got = memo[(name, tuple(b.pattern.shape))] = (b.query_valid, make())
    return got[1]


def entry_mask(b: LayerBundle) -> Tensor:
    """Bool[batch, 1, query_pos, key_pos]: valid entries of valid query rows."""
    return _mask_derived(b, "entry_mask", lambda: (b.valid & b.query_valid[:, :, None])[:, None])


def n_entries(b: LayerBundle) -> Tensor:
    """The number of :func:`entry_mask` entries (a 0-d tensor)."""
    return _mask_derived(b, "n_entries", lambda: entry_mask(b).sum())


def layer_tiles(b: LayerBundle) -> list[tuple[slice, slice, slice]]:
    """:func:`tiles` of a bundle's pattern (made once per pass and mask)."""
    return _mask_derived(b, "tiles", lambda: tiles(b.pattern, b.valid))


def zeroer(b: LayerBundle) -> "Zeroer":
    """The bundle's :class:`Zeroer` (made once per pass and mask: its per-tile masks are shared)."""
    return _mask_derived(b, "zeroer", lambda: Zeroer(b, entry_mask(b)))


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


#: An accumulator's ``kernel`` argument: ``"auto"`` takes the fused C kernels
#: (:mod:`bayesmanifold.kernels`) where they are built and apply (contiguous float32 CPU tensors),
#: ``"torch"`` always the tiled PyTorch code.
KERNEL_CHOICES = ("auto", "torch")


def kernel_choice(kernel: str) -> str:
    """Validate an accumulator's ``kernel`` argument."""
    if kernel not in KERNEL_CHOICES:
        raise InputError(f"kernel must be one of {', '.join(map(repr, KERNEL_CHOICES))}, got {kernel!r}")
    return kernel


def use_kernels(kernel: str, *tensors: Tensor) -> bool:
    """Whether this bundle's tiles go through the fused kernels."""
    return kernel == "auto" and kernels.usable(*tensors)


def f64_rows(x: Tensor) -> Tensor:
    """Sum of ``[batch, head, query]`` row results over batch and queries, in float64."""
    return x.sum((0, 2), dtype=torch.float64)


class Zeroer:
    """Zeroes the masked entries of a tile in place, as cheaply as is safe.

    Only the keys from the tile's first masked column on are touched (under a causal mask, the
    diagonal block: the columns before it are valid for every query of the tile). Multiplying by a
    0/1 float mask is an order of magnitude faster on CPU than ``masked_fill_`` with a broadcast
    mask, but keeps a NaN and turns a negative value into −0 (``+ 0.0`` makes it +0). Autograd
    leaves NaN only where a whole row is masked (softmax over no key); such rows exist only with
    padding, so layers with an invalid query row take ``masked_fill_``.
    """

    def __init__(self, b: LayerBundle, mask: Tensor) -> None:
        self.mask = mask
        self.fast = bool(b.query_valid.all())
        self._cols: dict[tuple[int, int, int], tuple[int, Tensor, int]] = {}
        self._fill: dict[tuple[int, int, int, torch.dtype], Tensor] = {}

    def _tail(self, qs: slice, ks: slice) -> tuple[int, Tensor, int]:
        """(first masked column k0 relative to the tile, the mask's columns from k0 on, masked count)."""
        key = (qs.start, qs.stop, ks.stop)
        if key not in self._cols:
            m = self.mask[:, :, qs, ks]
            bad = (~m).any(0).any(0).any(0).nonzero()
            k0 = int(bad[0]) if bad.numel() else m.shape[-1]
            tail = m[..., k0:]
            self._cols[key] = (k0, tail, tail.numel() - int(tail.sum()))
        return self._cols[key]

    def n_masked(self, qs: slice, ks: slice) -> int:
        """Masked entries of one head's tile."""
        return self._tail(qs, ks)[2]

    def tile(self, qs: slice, ks: slice, dtype: torch.dtype) -> Callable[[Tensor], Tensor]:
        k0, tail, n = self._tail(qs, ks)
        if n == 0:
            return lambda x: x
        key = (qs.start, qs.stop, ks.stop, dtype)
        if key not in self._fill:
            self._fill[key] = tail.to(dtype) if self.fast else ~tail
        fill = self._fill[key]
        if self.fast:
            return lambda x: (x[..., k0:].mul_(fill).add_(0.0), x)[1]
        return lambda x: (x[..., k0:].masked_fill_(fill, 0), x)[1]


class Scratch:
    """Reusable temporaries for one layer's tiles: ``n`` flat buffers as large as the largest tile.

    Allocating a fresh multi-megabyte temporary per tile costs page faults on CPU (each is a new
    mapping); views of these buffers do not.
    """

    def __init__(self, like: Tensor, tile_list: list[tuple[slice, slice, slice]], n: int,
                 dtype: torch.dtype | None = None) -> None:
        b = like.shape[0]
        size = max((b * (t[0].stop - t[0].start) * (t[1].stop - t[1].start) * t[2].stop for t in tile_list), default=0)
        self.bufs = [like.new_empty(size, dtype=dtype or like.dtype) for _ in range(n)]

    def get(self, i: int, shape: tuple[int, ...] | torch.Size) -> Tensor:
        return self.bufs[i][:math.prod(shape)].view(shape)


class RowBuffers:
    """Per-row results of one layer's tiles, ``[batch, head, query]`` each, written in place.

    Tile results go straight into their slice (``out=``), so each statistic costs one op per tile;
    the reductions over rows run once per layer (:func:`f64_rows`, in float64).
    """

    def __init__(self, names: list[str], like: Tensor) -> None:
        self.t = {n: like.new_zeros(like.shape[:3]) for n in names}

    def __getitem__(self, name: str) -> Tensor:
        return self.t[name]

    def at(self, name: str, hs: slice, qs: slice) -> Tensor:
        return self.t[name][:, hs, qs]

