"""Which hook points bayesmanifold attaches to, and how layer/head selections are normalised.

An attention layer is found by its TransformerLens hook names
(``blocks.{l}.attn.hook_attn_scores``, ``hook_pattern``, ``hook_v``, ``hook_z``), so any
``HookedRootModule`` named like TransformerLens works, not only ``HookedTransformer``.
"""

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from torch import nn

from ..errors import ModelError, SelectionError

__all__ = ["AttentionLayerInfo", "find_attention_layers", "select_layers", "select_heads", "ATTN_HOOKS"]

# The four hook points capture needs per layer, in TransformerLens's names.
ATTN_HOOKS = ("hook_attn_scores", "hook_pattern", "hook_v", "hook_z")
_LAYER_RE = re.compile(r"^blocks\.(\d+)\.attn\.(hook_attn_scores|hook_pattern|hook_v|hook_z)$")


@dataclass(frozen=True)
class AttentionLayerInfo:
    """Static facts about one attention layer of a hooked model."""

    layer: int
    n_heads: int | None  # None when the module does not say; then read from the shapes
    n_kv_heads: int | None
    attn_scale: float | None


def _require_hooked(model: object) -> None:
    from transformer_lens.hook_points import HookedRootModule

    if not isinstance(model, HookedRootModule):
        raise ModelError(
            f"expected a TransformerLens model (HookedTransformer or another HookedRootModule), "
            f"got {type(model).__name__}; load HuggingFace models with bayesmanifold.load_model"
        )


def find_attention_layers(model: nn.Module) -> dict[int, AttentionLayerInfo]:
    """Find every attention layer that has the four hook points capture needs.

    Raises:
        ModelError: the model is not a ``HookedRootModule`` or has no such layer.
    """
    _require_hooked(model)
    found: dict[int, set[str]] = {}
    for name in model.hook_dict:
        m = _LAYER_RE.match(name)
        if m:
            found.setdefault(int(m.group(1)), set()).add(m.group(2))
    complete = sorted(layer for layer, names in found.items() if set(ATTN_HOOKS) <= names)
    if not complete:
        raise ModelError(
            f"{type(model).__name__} has no attention layer with hook points "
            f"blocks.L.attn.{{{', '.join(ATTN_HOOKS)}}}; is it a TransformerLens model?"
        )
    infos = {}
    for layer in complete:
        attn = model.get_submodule(f"blocks.{layer}.attn")
        cfg = getattr(attn, "cfg", None)
        n_heads = getattr(cfg, "n_heads", None)
        n_kv = getattr(cfg, "n_key_value_heads", None) or n_heads
        scale = getattr(attn, "attn_scale", None)
        infos[layer] = AttentionLayerInfo(
            layer=layer,
            n_heads=int(n_heads) if n_heads is not None else None,
            n_kv_heads=int(n_kv) if n_kv is not None else None,
            attn_scale=float(scale) if scale is not None else None,
        )
    return infos


def select_layers(infos: dict[int, AttentionLayerInfo], layers: int | Iterable[int] | None) -> list[int]:
    """Normalise a layer selection (None = all; an int; an iterable; negatives count from the end)."""
    available = sorted(infos)
    if layers is None:
        return available
    if isinstance(layers, int):
        layers = [layers]
    out = []
    for layer in layers:
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
    if isinstance(heads, int):
        heads = [heads]
    out = []
    for h in heads:
        if not isinstance(h, int) or isinstance(h, bool) or not -n_heads <= h < n_heads:
            raise SelectionError(f"head {h!r} is out of range for layer {layer}; accepted: 0..{n_heads - 1}")
        h = h % n_heads
        if h not in out:
            out.append(h)
    if not out:
        raise SelectionError("empty head selection; pass None for all heads")
    return sorted(out)
