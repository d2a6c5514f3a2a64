"""Per-row statistics of one attention tile through the fused C kernels (see ``tile_stats.c``).

Each function takes whole ``[batch, head, query, key]`` float32 tensors (contiguous, on the CPU),
one tile ``(heads, queries, keys)`` of slices as :func:`bayesmanifold.analyses.headstats.tiles`
makes them (keys from 0), and writes into ``[batch, head, query]`` row buffers at the tile's rows.
:func:`usable` says whether tensors qualify; callers keep their PyTorch path for the rest.
"""

import ctypes
from collections.abc import Sequence

import torch
from torch import Tensor

from .build import load

__all__ = ["usable", "advantage_rows", "law_rows", "entropy_rows", "ADVANTAGE_ROWS", "LAW_ROWS"]

#: What :func:`advantage_rows` writes, in its order.
ADVANTAGE_ROWS = ("n_positive", "sum_adv", "sum_adv_sq", "min_adv", "max_adv", "mass", "alpha_adv", "alpha_pos_adv",
                  "wmax", "amax", "tot", "gmax", "glogg")
#: What :func:`law_rows` writes, in its order.
LAW_ROWS = ("res_s", "max_s", "res_p", "max_p", "rowsum", "row_scale", "alpha_sum")

Tile = tuple[slice, slice, slice]


def usable(*tensors: Tensor) -> bool:
    """True when the kernels are built and every tensor is a contiguous float32 CPU tensor."""
    return all(t is not None and t.device.type == "cpu" and t.dtype == torch.float32 and t.is_contiguous()
               for t in tensors) and load() is not None


def _tile(x: Tensor, tile: Tile) -> tuple[int, int, int, int, int]:
    hs, qs, ks = tile
    if ks.start not in (0, None):
        raise ValueError("kernel tiles start at key 0")
    b = x.shape[0]
    return b, hs.stop - hs.start, qs.stop - qs.start, ks.stop, (hs.start * x.stride(1) + qs.start * x.stride(2)) * x.element_size()


def _outs(rows: dict[str, Tensor], names: Sequence[str], tile: Tile) -> tuple[ctypes.Array, int, int]:
    hs, qs, _ = tile
    first = rows[names[0]]
    off = (hs.start * first.stride(1) + qs.start) * first.element_size()
    for n in names:
        r = rows[n]
        if r.dtype != torch.float32 or r.stride() != first.stride() or r.stride(2) != 1:
            raise ValueError("row buffers must be float32 [batch, head, query] of one layout")
    ptrs = (ctypes.c_void_p * len(names))(*[rows[n].data_ptr() + off for n in names])
    return ptrs, first.stride(0), first.stride(1)


def _mask(mask: Tensor, tile: Tile) -> tuple[int, int, int]:
    """``mask``: Bool[batch, 1, query, key] (the entry mask), keys contiguous."""
    if mask.dtype != torch.bool or mask.stride(3) != 1:
        raise ValueError("the entry mask must be a bool tensor with contiguous keys")
    return mask.data_ptr() + tile[1].start * mask.stride(2), mask.stride(0), mask.stride(2)


def advantage_rows(pattern: Tensor, grad_pattern: Tensor, grad_scores: Tensor, mask: Tensor, tile: Tile,
                   rows: dict[str, Tensor], hist: Tensor | None) -> None:
    """:data:`ADVANTAGE_ROWS` of the tile's rows into ``rows``; ``hist`` (int64 ``[tile heads, 2048]``)
    gains the tile's counts of advantage codes (``sum_adv_sq`` is the sum of squares)."""
    b, h, q, k, off = _tile(pattern, tile)
    m, mb, mq = _mask(mask, tile)
    ptrs, ob, oh = _outs(rows, ADVANTAGE_ROWS, tile)
    if hist is not None and (hist.dtype != torch.int64 or not hist.is_contiguous() or hist.shape != (h, 2048)):
        raise ValueError(f"hist must be a contiguous int64 tensor of shape ({h}, 2048)")
    if b * q * k >= 2**31:
        raise ValueError(f"a tile of {b * q * k} entries per head is too large for the kernel's counters (< 2^31)")
    load().adv_rows(b, h, q, k, pattern.data_ptr() + off, grad_pattern.data_ptr() + off, grad_scores.data_ptr() + off,
                    pattern.stride(0), pattern.stride(1), pattern.stride(2), m, mb, mq, ptrs, ob, oh,
                    None if hist is None else hist.data_ptr(), torch.get_num_threads())


def law_rows(pattern: Tensor, grad_pattern: Tensor, grad_scores: Tensor, compat: Tensor, mask: Tensor, tile: Tile,
             rows: dict[str, Tensor]) -> None:
    """:data:`LAW_ROWS` of the tile's rows into ``rows``; ``compat``: u·v of the tile, contiguous
    ``[batch, tile heads, tile queries, tile keys]``."""
    b, h, q, k, off = _tile(pattern, tile)
    if compat.shape != (b, h, q, k) or not compat.is_contiguous() or compat.dtype != torch.float32:
        raise ValueError(f"compat must be a contiguous float32 tensor of shape {(b, h, q, k)}")
    m, mb, mq = _mask(mask, tile)
    ptrs, ob, oh = _outs(rows, LAW_ROWS, tile)
    load().law_rows(b, h, q, k, pattern.data_ptr() + off, grad_pattern.data_ptr() + off, grad_scores.data_ptr() + off,
                    pattern.stride(0), pattern.stride(1), pattern.stride(2), compat.data_ptr(), m, mb, mq, ptrs, ob, oh,
                    torch.get_num_threads())


def entropy_rows(pattern: Tensor, tile: Tile, out: Tensor) -> None:
    """Σ_j α_ij ln α_ij (0 ln 0 = 0) of the tile's rows into ``out`` (float32 ``[batch, head, query]``)."""
    b, h, q, k, off = _tile(pattern, tile)
    ptrs, ob, oh = _outs({"out": out}, ["out"], tile)
    load().entropy_rows(b, h, q, k, pattern.data_ptr() + off, pattern.stride(0), pattern.stride(1), pattern.stride(2),
                        ptrs[0], ob, oh, torch.get_num_threads())
