"""The TransformerBridge backend of the model-access layer (TransformerLens 4.x, and 3.x's bridge).

A ``TransformerBridge`` wraps a HuggingFace module (``boot_transformers``) or TransformerLens's
native one (``boot_native``). Capture asks this backend for the same sites as on a
``HookedTransformer`` and gets the same tensors, with TransformerLens's shapes. The traps it hides
(measured on 4.3; DESIGN.md, "TransformerLens 4"):

- Raw PyTorch hooks on a bridge see flat tensors (``[batch, pos, heads*d_head]`` for q, k, v, z;
  ``[batch, head, pos, d_head]`` for rotary q, k). :meth:`BridgeAccess.add_forward_hook` hands
  the hook a view with TransformerLens's shape and, when the pass records gradients, puts the
  view back into the forward pass (reshaped back), so that a gradient hook registered on the view
  fires with the gradient in that shape.
- ``hook_attn_scores`` is not always the softmax's input (``boot_native`` fires it after the
  softmax; a naive routing check then reports a residual of 1.0). The ``scores`` site is read
  where it cannot be wrong: the input of the one softmax call inside the attention module,
  intercepted with a ``TorchFunctionMode`` while that module runs. An attention that takes no
  explicit softmax (SDPA, flash attention) is refused with a :class:`ModelError`.
- Masked scores are ``finfo(dtype).min`` (−inf in compatibility mode): valid entries are those
  above ``finfo.min / 2``.
- HuggingFace's scaling is a multiplier; ``attn_scale`` here is the divisor, as on a
  HookedTransformer.
- HuggingFace's Llama-family eager attention takes the softmax in float32 even in a float64 model:
  the laws then hold to float32 precision (~1e-7). The dtype is read from the softmax call and
  recorded per layer (:attr:`AttentionLayerInfo.softmax_dtype`) as the pass runs.
"""

import math
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import torch
import torch.nn.functional as F
from jaxtyping import Bool, Float
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from ..errors import ModelError, SelectionError
from . import bridge_loading
from .base import AttentionLayerInfo, Backend
from .batch import Batch

__all__ = ["BridgeBackend", "is_bridge"]


def is_bridge(model: object) -> bool:
    """Whether ``model`` is a TransformerLens ``TransformerBridge`` (False when TransformerLens has none)."""
    try:
        from transformer_lens.model_bridge import TransformerBridge
    except ImportError:
        return False
    return isinstance(model, TransformerBridge)


class _SoftmaxTap(TorchFunctionMode):
    """While active, hands the input of every 4-D softmax over the last axis to ``on_scores``
    (or, with ``on_qk``, the operands of the first 4-D ``q @ kᵀ`` matmul to it)."""

    def __init__(self, on_scores: Callable[[Tensor, torch.dtype | None], Tensor | None],
                 on_qk: Callable[[Tensor, Tensor], None] | None = None) -> None:
        super().__init__()
        self.on_scores = on_scores
        self.on_qk = on_qk
        self.calls = 0

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if self.on_qk is not None and func is torch.matmul and len(args) == 2 and args[0].dim() == 4:
            if not self.calls and args[1].shape[-2] == args[0].shape[-1]:
                self.calls += 1
                self.on_qk(args[0], args[1])
            return func(*args, **kwargs)
        if self.on_qk is None and getattr(func, "__name__", None) == "softmax" and args and isinstance(args[0], Tensor) and args[0].dim() == 4:
            dim = kwargs.get("dim", args[1] if len(args) > 1 else None)
            if dim in (-1, 3):
                self.calls += 1
                at = 3 if func is F.softmax else 2  # F.softmax(input, dim, _stacklevel, dtype)
                dtype = kwargs.get("dtype", args[at] if len(args) > at else None)
                new = self.on_scores(args[0], dtype)
                if new is not None:
                    args = (new, *args[1:])
        return func(*args, **kwargs)


class _Handles:
    """One ``remove()`` for several hook handles."""

    def __init__(self, *handles: Any) -> None:
        self.handles = handles

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


class BridgeBackend(Backend):
    """Facts about a ``TransformerBridge`` and its sites, with TransformerLens's shapes.

    Args:
        model: a ``TransformerBridge`` (``boot_transformers``, ``boot_native``; default or
            compatibility mode).

    Raises:
        ModelError: not a bridge, no attention layer with the hook points capture needs, or an
            attention implementation without an explicit softmax (load with
            ``attn_implementation="eager"``).
    """

    name = "TransformerBridge"
    FINAL_HOOK = "ln_final.hook_out"  # the bridge's final norm output (no hook_normalized)

    def __init__(self, model: nn.Module) -> None:  # noqa: D107 - documented on the class
        if not is_bridge(model):
            raise ModelError(f"expected a TransformerLens TransformerBridge, got {type(model).__name__}")
        self.model = model
        self.cfg = getattr(model, "cfg", None)
        blocks = getattr(model, "blocks", None)
        if blocks is None or len(blocks) == 0:
            raise ModelError(f"{type(model).__name__} has no blocks: is it a decoder-only language model?")
        hd = model.hook_dict
        self.layers: dict[int, AttentionLayerInfo] = {}
        for layer in range(len(blocks)):
            names = [self.hook_name(s, layer) for s in ("pattern", "v", "z")]
            attn = getattr(blocks[layer], "attn", None)
            if attn is None or not all(n in hd for n in names):
                continue
            inner = getattr(attn, "original_component", None)
            impl = getattr(getattr(inner, "config", None), "_attn_implementation", None)
            if impl not in (None, "eager"):
                raise ModelError(
                    f"layer {layer}'s attention runs with attn_implementation={impl!r}, which takes no explicit "
                    "softmax: capture needs the attention scores; load the model with attn_implementation='eager' "
                    "(bayesmanifold.load_model does)"
                )
            self.layers[layer] = AttentionLayerInfo(
                layer=layer, n_heads=self.n_heads, n_kv_heads=self.n_kv_heads, attn_scale=_attn_scale(inner, layer)
            )
        if not self.layers:
            raise ModelError(f"{type(model).__name__} has no attention layer with hook points for pattern, v and z")

    # ------------------------------------------------------------------ which models; building and loading
    @classmethod
    def handles(cls, model: object) -> bool:
        return is_bridge(model)

    @classmethod
    def available(cls) -> bool:
        try:
            from transformer_lens.model_bridge import TransformerBridge  # noqa: F401
        except ImportError:
            return False
        return True

    @classmethod
    def build(cls, fields: dict[str, Any], *, seed: int, device: str | torch.device, dtype: torch.dtype,
              tokenizer: Any = None) -> nn.Module:
        return bridge_loading.build_native(fields, seed=seed, device=device, dtype=dtype, tokenizer=tokenizer)

    @classmethod
    def load_hf(cls, path: Any, *, dtype: torch.dtype, tokenizer: Any = None) -> nn.Module:
        return bridge_loading.load_hf_bridge(path, dtype=dtype, tokenizer=tokenizer)

    @classmethod
    def load_named(cls, name: str, *, device: str, dtype: torch.dtype) -> nn.Module:
        return bridge_loading.load_named_bridge(name, device=device, dtype=dtype)

    def load_state_dict(self, sd: Any, where: str) -> None:
        bridge_loading.load_bridge_state_dict(self.model, sd, where)

    def config_fields(self) -> dict[str, Any]:
        return bridge_loading.hooked_fields(self.cfg)

    def fresh_copy(self, seed: int = 0) -> nn.Module:
        """A newly initialised model of this architecture: a native bridge as built from its config,
        an HF-backed one as HuggingFace initialises its class (``from_config``), seeded."""
        hf = getattr(self.model, "original_model", None)
        if getattr(self.cfg, "architecture", None) == "TransformerLensNative" or hf is None:
            return super().fresh_copy(seed)
        return bridge_loading.fresh_hf_bridge(hf, seed=seed, dtype=self.dtype, tokenizer=self.tokenizer)

    def parameter_names(self, kind: str, layers: Any = None) -> list[str]:
        if kind == "all":
            return super().parameter_names(kind, layers)
        return _bridge_parameter_names(self.model, kind, layers)

    # ------------------------------------------------------------------ facts
    @property
    def softmax_dtype(self) -> torch.dtype | None:  # type: ignore[override]
        """The dtype the softmax was taken in where it differs from the model's (seen in a pass; else None)."""
        seen = {i.softmax_dtype for i in self.layers.values() if i.softmax_dtype is not None}
        return min(seen, key=lambda d: torch.finfo(d).bits) if seen else None

    # ------------------------------------------------------------------ hook names
    def has_site(self, site: str, layer: int | None = None) -> bool:
        if site == "scores":
            return layer in self.layers
        if site in ("q", "k") and self._rotary_inline(layer):
            return True
        return super().has_site(site, layer)

    def _rotary_inline(self, layer: int | None) -> bool:
        """Whether ``layer`` applies rotary inside its module, where ``hook_rot_q``/``hook_rot_k`` never fire (boot_native)."""
        if not self.is_rotary or layer not in self.layers:
            return False
        inner = getattr(self.model.blocks[layer].attn, "original_component", None)
        return type(inner).__name__ == "NativeAttention" and getattr(inner, "rotary", None) is not None

    def hook_point(self, site: str, layer: int | None = None) -> nn.Module:
        name = self.hook_name(site, layer)
        if name not in self.model.hook_dict:
            raise SelectionError(f"{type(self.model).__name__} has no hook point {name!r} (site {site!r})")
        return self.model.hook_dict[name]

    def _shapes(self, site: str, name: str) -> tuple[Callable[[Tensor], Tensor], Callable[[Tensor, Tensor], Tensor]] | None:
        """(to TransformerLens's shape, back to the bridge's) for a site, or None when they agree."""
        if site in ("q", "k", "v", "z"):
            heads = self.n_heads if site in ("q", "z") else self.n_kv_heads
            if "hook_rot_" in name:  # HuggingFace layout [batch, head, pos, d_head]
                return (lambda t: t.transpose(1, 2)), (lambda t, like: t.transpose(1, 2))

            def to_site(t: Tensor) -> Tensor:
                return t if t.dim() == 4 else t.unflatten(-1, (heads, -1))

            def back(t: Tensor, like: Tensor) -> Tensor:
                return t if like.dim() == 4 else t.flatten(-2)

            return to_site, back
        return None

    def add_forward_hook(self, site: str, layer: int | None, fn: Any) -> Any:
        """Register ``fn(module, inputs, output)`` with ``output`` in TransformerLens's shape; returns a handle.

        ``fn`` may return a replacement (in that shape). When the pass records gradients, the
        view ``fn`` saw is what the model goes on with, so ``output.register_hook`` in ``fn``
        receives the gradient in TransformerLens's shape.
        """
        if site == "scores":
            return self._tap_scores(layer, fn)
        if site in ("q", "k") and self._rotary_inline(layer):
            return self._tap_qk(layer, site, fn)
        point = self.hook_point(site, layer)
        shapes = self._shapes(site, self.hook_name(site, layer))
        if shapes is None:
            return point.register_forward_hook(fn)
        to_site, back = shapes

        def hook(module: nn.Module, inputs: Any, output: Tensor) -> Tensor | None:
            view = to_site(output)
            new = fn(module, inputs, view)
            if new is not None:
                return back(new, output)
            if view is not output and output.requires_grad and torch.is_grad_enabled():
                return back(view, output)  # the model reads the view: gradient hooks on it fire
            return None

        return point.register_forward_hook(hook)

    def _tap_qk(self, layer: int, site: str, fn: Any) -> _Handles:
        """q or k after rotary on a boot_native bridge: the operands of its ``q @ kᵀ`` (read-only).

        The native model rotates adjacent pairs where a HookedTransformer rotates (i, i + r/2): the
        dimensions are given back in the HookedTransformer's order (see ``bridge_loading``).
        """
        attn = self.model.blocks[layer].attn
        inner = attn.original_component
        r = getattr(inner.rotary, "rotary_dim", self.d_head)
        half = torch.arange(r // 2)
        native = torch.cat([torch.stack([half, half + r // 2], 1).flatten(), torch.arange(r, self.d_head)])
        back = torch.argsort(native)
        group = self.n_heads // self.n_kv_heads

        def on_qk(q: Tensor, kt: Tensor) -> None:
            t = q if site == "q" else kt.transpose(-2, -1)[:, ::group]  # k is expanded over the GQA group
            fn(attn, (), t.transpose(1, 2)[..., back.to(t.device)].detach())

        return self._tap(layer, None, on_qk)

    def _tap_scores(self, layer: int | None, fn: Any) -> _Handles:
        if layer not in self.layers:
            raise SelectionError(f"layer {layer} has no attention scores to tap; attention layers: {sorted(self.layers)}")
        attn = self.model.blocks[layer].attn

        def on_scores(scores: Tensor, dtype: torch.dtype | None) -> Tensor | None:
            if dtype is not None and dtype != scores.dtype:
                self.layers[layer] = replace(self.layers[layer], softmax_dtype=dtype)
            return fn(attn, (), scores)

        return self._tap(layer, on_scores, None)

    def _tap(self, layer: int, on_scores: Any, on_qk: Any) -> _Handles:
        attn = self.model.blocks[layer].attn
        taps: list[_SoftmaxTap] = []
        what = "softmax calls" if on_qk is None else "q·kᵀ products"

        def enter(module: nn.Module, args: Any) -> None:
            tap = _SoftmaxTap(on_scores, on_qk)
            taps.append(tap)
            tap.__enter__()

        def leave(module: nn.Module, args: Any, output: Any) -> None:
            if not taps:
                return
            tap = taps.pop()
            tap.__exit__(None, None, None)
            if tap.calls != 1:
                raise ModelError(
                    f"layer {layer}'s attention took {tap.calls} {what} over [batch, head, query, key] "
                    "(expected exactly one): capture cannot tell which one's input are the attention scores"
                    + ("; load the model with attn_implementation='eager'" if tap.calls == 0 else "")
                )

        return _Handles(attn.register_forward_pre_hook(enter), attn.register_forward_hook(leave, always_call=True))

    @staticmethod
    def valid_from_scores(scores: Float[Tensor, "batch query_pos key_pos"]) -> Bool[Tensor, "batch query_pos key_pos"]:
        """Which score entries are not masked (bridges mask with ``finfo.min``, or −inf in compatibility mode)."""
        return scores > torch.finfo(scores.dtype).min / 2

    # ------------------------------------------------------------------ inputs and weights
    def prepare_batch(self, inputs: Any, attention_mask: Tensor | None = None) -> Batch:
        """As :meth:`Backend.prepare_batch`; refuses left padding where the bridge's gradients are wrong.

        TransformerLens 3.x bridges in compatibility mode mask with −inf and take the softmax of
        fully masked (left-padding) query rows as is: its NaN leaks into every gradient (4.x masks
        those rows first).
        """
        batch = super().prepare_batch(inputs, attention_mask)
        m = batch.attention_mask
        if m is not None and bool((m[:, 0] == 0).any()) and getattr(self.model, "compatibility_mode", False):
            from transformer_lens.model_bridge.generalized_components.attention import (
                AttentionBridge,
            )

            if not hasattr(AttentionBridge, "_masked_softmax"):
                raise ModelError(
                    "left padding on a TransformerBridge in compatibility mode: this TransformerLens version takes "
                    "the softmax of fully masked rows as is and its NaN reaches every gradient; use right padding, "
                    "the bridge's default mode, or TransformerLens 4"
                )
        return batch

    def key_layer_norm(self, layer: int) -> nn.Module | None:
        ln = getattr(self.model.blocks[layer], "ln1", None)
        inner = getattr(ln, "original_component", ln)
        return None if ln is None or isinstance(inner, nn.Identity) else ln


def _attn_scale(inner: Any, layer: int) -> float | None:
    """The divisor of q·k (HookedTransformer's ``attn_scale``) from the wrapped attention module."""
    if inner is None:
        return None
    scale = getattr(inner, "scale", None)  # TransformerLens's native attention: a divisor
    if isinstance(scale, int | float) and scale > 0:
        return float(scale)
    scaling = getattr(inner, "scaling", None)  # HuggingFace: a multiplier
    if not isinstance(scaling, int | float) or scaling <= 0:
        return None
    divisor = 1.0 / float(scaling)
    if getattr(inner, "scale_attn_by_inverse_layer_idx", False):  # GPT-2's option, applied separately
        divisor *= float(getattr(inner, "layer_idx", layer) + 1)
    return divisor if math.isfinite(divisor) else None


def _bridge_parameter_names(model: nn.Module, kind: str, layers: Any = None) -> list[str]:
    """Names (as ``named_parameters`` gives them) of a bridge's attention ``"qk"`` or ``"values"`` parameters.

    Raises:
        SelectionError: the architecture stores q, k and v in one matrix (GPT-2, GPT-NeoX): they
            cannot be stepped apart.
    """
    names = {id(p): n for n, p in model.named_parameters()}
    subs = ("q", "k") if kind == "qk" else ("v",)
    out: list[str] = []
    for layer, block in enumerate(model.blocks):
        if layers is not None and layer not in layers:
            continue
        attn = getattr(block, "attn", None)
        if attn is None:
            continue
        own = {s: [p for p in getattr(attn, s).parameters()] if hasattr(attn, s) else [] for s in ("q", "k", "v")}
        other = {id(p) for s in ("q", "k", "v") if s not in subs for p in own[s]}
        for s in subs:
            for p in own[s]:
                if id(p) in other or id(p) not in names:
                    raise SelectionError(
                        f"layer {layer} stores q, k and v in one matrix: its {kind} parameters cannot be stepped "
                        "apart; step 'all'"
                    )
                if p.is_floating_point() and names[id(p)] not in out:
                    out.append(names[id(p)])
    return out
