"""Normalising layer and head selections (TransformerLens conventions: negatives count from the end)."""

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from ..errors import SelectionError

__all__ = ["select_layers", "select_heads"]


def select_layers(infos: Mapping[int, Any], layers: int | Iterable[int] | None) -> list[int]:
    """Normalise a layer selection (None = all; an int; an iterable; negatives count from the end)."""
    available = sorted(infos)
    if layers is None:
        return available
    if isinstance(layers, int) or _is_np_int(layers):
        layers = [layers]
    if isinstance(layers, str) or not isinstance(layers, Iterable):
        raise SelectionError(f"layers must be an int, a list of ints or None, got {type(layers).__name__}")
    out = []
    for layer in layers:
        if _is_np_int(layer):
            layer = int(layer)
        if not isinstance(layer, int) or isinstance(layer, bool):
            raise SelectionError(f"layer {layer!r} is not an integer; accepted: 0..{available[-1]}")
        idx = layer + len(available) if layer < 0 else layer
        if idx not in infos:
            raise SelectionError(
                f"layer {layer} is out of range; the model has attention layers {available[0]}..{available[-1]}"
            )
        if idx not in out:
            out.append(idx)
    if not out:
        raise SelectionError("empty layer selection; pass None for all layers")
    return sorted(out)


def select_heads(n_heads: int, heads: int | Sequence[int] | None, *, layer: int) -> list[int]:
    """Normalise a head selection for one layer (None = all heads)."""
    if heads is None:
        return list(range(n_heads))
    if isinstance(heads, int) or _is_np_int(heads):
        heads = [heads]
    out = []
    for h in heads:
        if _is_np_int(h):
            h = int(h)
        if not isinstance(h, int) or isinstance(h, bool) or not -n_heads <= h < n_heads:
            raise SelectionError(f"head {h!r} is out of range for layer {layer}; accepted: 0..{n_heads - 1}")
        h = h % n_heads
        if h not in out:
            out.append(h)
    if not out:
        raise SelectionError("empty head selection; pass None for all heads")
    return sorted(out)


def _is_np_int(x: Any) -> bool:
    return isinstance(x, np.integer)
