"""The model-access layer: everything bayesmanifold knows about a model's internals, in one place.

Analyses never read hook names, head counts, masks or attention scales themselves: they ask a
:class:`ModelAccess` for them, by *site* (what a tensor is, e.g. ``"pattern"`` or
``"resid_post"``), and capture maps sites to the backend's hook points. This module is the
HookedTransformer backend (TransformerLens 2.18 and 3.x, and any ``HookedRootModule`` named like
TransformerLens); another backend is another class with the same methods, chosen by
:func:`model_access`.

Sites, with TransformerLens's shapes:

- per attention layer: ``q``, ``k`` (as they enter the dot product: after rotary when the model
  is rotary) ``[batch, pos, head, d_head]``, ``v`` ``[batch, pos, kv_head, d_head]``, ``z``
  ``[batch, pos, head, d_head]``, ``scores`` and ``pattern`` ``[batch, head, query_pos, key_pos]``;
- per block: ``resid_pre``, ``resid_post`` ``[batch, pos, d_model]``;
- per model: ``embed`` (the gradient leaf of capture), ``final`` (the final normalised residual,
  what the unembedding reads) ``[batch, pos, d_model]``.
"""

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor, nn

from ..errors import InputError, ModelError, SelectionError
from .batch import Batch
from .selection import select_heads, select_layers

__all__ = [
    "AttentionLayerInfo",
    "ModelAccess",
    "model_access",
    "select_layers",
    "select_heads",
    "ATTN_SITES",
    "BLOCK_SITES",
    "MODEL_SITES",
]

ATTN_SITES = ("q", "k", "v", "z", "scores", "pattern")
BLOCK_SITES = ("resid_pre", "resid_post")
MODEL_SITES = ("embed", "final")
# Capture's four per-layer hook points (the gradient laws need exactly these).
CORE_SITES = ("scores", "pattern", "v", "z")
# The order in which a layer's sites fire in a forward pass.
SITE_ORDER = ("resid_pre", "q", "k", "v", "scores", "pattern", "z", "resid_post")

_TL_NAME = {
    "q": "attn.hook_q",
    "k": "attn.hook_k",
    "v": "attn.hook_v",
    "z": "attn.hook_z",
    "scores": "attn.hook_attn_scores",
    "pattern": "attn.hook_pattern",
    "resid_pre": "hook_resid_pre",
    "resid_post": "hook_resid_post",
}
_LAYER_RE = re.compile(r"^blocks\.(\d+)\.attn\.(hook_attn_scores|hook_pattern|hook_v|hook_z)$")


@dataclass(frozen=True)
class AttentionLayerInfo:
    """Static facts about one attention layer of a hooked model."""

    layer: int
    n_heads: int | None  # None when the module does not say; then read from the shapes
    n_kv_heads: int | None
    attn_scale: float | None
    softmax_dtype: torch.dtype | None = None  # set when the softmax runs in another dtype than the model


def _require_hooked(model: object) -> None:
    try:
        from transformer_lens.hook_points import HookedRootModule
    except ImportError:  # TransformerLens 4 exports it from the top level only
        from transformer_lens import HookedRootModule

    if not isinstance(model, HookedRootModule):
        raise ModelError(
            f"expected a TransformerLens model (HookedTransformer or another HookedRootModule), "
            f"got {type(model).__name__}; load HuggingFace models with bayesmanifold.load_model"
        )


class ModelAccess:
    """Facts about a TransformerLens ``HookedRootModule`` and the names of its hook points.

    Args:
        model: a ``HookedTransformer`` or any ``HookedRootModule`` named like TransformerLens.

    Raises:
        ModelError: the model is not a ``HookedRootModule`` or has no attention layer with the
            four hook points capture needs.
    """

    backend = "HookedTransformer"
    #: site -> hook point name inside ``blocks.{layer}`` (rotary q/k are read at ``hook_rot_*``)
    SITE_NAMES: dict[str, str] = _TL_NAME
    #: the final normalised residual's hook point
    FINAL_HOOK = "ln_final.hook_normalized"
    #: The dtype the softmax is taken in, when it differs from the model's (None: the model's).
    softmax_dtype: torch.dtype | None = None

    def __init__(self, model: nn.Module) -> None:
        _require_hooked(model)
        self.model = model
        self.cfg = getattr(model, "cfg", None)
        found: dict[int, set[str]] = {}
        for name in model.hook_dict:
            m = _LAYER_RE.match(name)
            if m:
                found.setdefault(int(m.group(1)), set()).add(m.group(2))
        needed = {_TL_NAME[s].split(".")[-1] for s in CORE_SITES}
        complete = sorted(layer for layer, names in found.items() if needed <= names)
        if not complete:
            raise ModelError(
                f"{type(model).__name__} has no attention layer with hook points "
                f"blocks.L.attn.{{{', '.join(sorted(needed))}}}; is it a TransformerLens model?"
            )
        self.layers: dict[int, AttentionLayerInfo] = {}
        for layer in complete:
            attn = model.get_submodule(f"blocks.{layer}.attn")
            acfg = getattr(attn, "cfg", None)
            n_heads = getattr(acfg, "n_heads", None)
            n_kv = getattr(acfg, "n_key_value_heads", None) or n_heads
            scale = getattr(attn, "attn_scale", None)
            self.layers[layer] = AttentionLayerInfo(
                layer=layer,
                n_heads=int(n_heads) if n_heads is not None else None,
                n_kv_heads=int(n_kv) if n_kv is not None else None,
                attn_scale=float(scale) if scale is not None else None,
            )

    # ------------------------------------------------------------------ facts
    def _cfg(self, name: str) -> Any:
        if self.cfg is None or getattr(self.cfg, name, None) is None:
            raise ModelError(f"{type(self.model).__name__} has no cfg.{name}; a HookedTransformer has one")
        return getattr(self.cfg, name)

    @property
    def n_layers(self) -> int:
        return int(self._cfg("n_layers"))

    @property
    def n_heads(self) -> int:
        return int(self._cfg("n_heads"))

    @property
    def n_kv_heads(self) -> int:
        n_kv = getattr(self.cfg, "n_key_value_heads", None)
        return int(n_kv) if n_kv else self.n_heads

    @property
    def d_head(self) -> int:
        return int(self._cfg("d_head"))

    @property
    def d_model(self) -> int:
        return int(self._cfg("d_model"))

    @property
    def d_vocab(self) -> int | None:
        v = getattr(self.cfg, "d_vocab", None)
        return int(v) if v is not None else None

    @property
    def n_ctx(self) -> int | None:
        v = getattr(self.cfg, "n_ctx", None)
        return int(v) if v is not None else None

    @property
    def is_rotary(self) -> bool:
        return getattr(self.cfg, "positional_embedding_type", None) == "rotary"

    @property
    def device(self) -> torch.device:
        if self.cfg is not None and getattr(self.cfg, "device", None) is not None:
            return torch.device(self.cfg.device)
        for p in self.model.parameters():
            return p.device
        return torch.device("cpu")

    @property
    def dtype(self) -> torch.dtype:
        for p in self.model.parameters():
            return p.dtype
        return torch.float32

    @property
    def tokenizer(self) -> Any:
        return getattr(self.model, "tokenizer", None)

    def kv_of_head(self, head: int) -> int:
        """The key/value head that query head ``head`` reads (GQA: h // (n_heads // n_kv))."""
        return head // (self.n_heads // self.n_kv_heads)

    # ------------------------------------------------------------------ hook names
    def hook_name(self, site: str, layer: int | None = None) -> str:
        """The hook point of ``site`` (of ``layer`` for per-layer sites)."""
        if site == "embed":
            return "hook_embed"
        if site == "final":
            return self.FINAL_HOOK
        if site not in self.SITE_NAMES:
            raise SelectionError(f"unknown site {site!r}; accepted: {', '.join(ATTN_SITES + BLOCK_SITES + MODEL_SITES)}")
        if layer is None:
            raise SelectionError(f"site {site!r} is per layer: give a layer")
        name = self.SITE_NAMES[site]
        if site in ("q", "k") and self.is_rotary:
            name = name.replace("hook_", "hook_rot_")
        return f"blocks.{layer}.{name}"

    def has_site(self, site: str, layer: int | None = None) -> bool:
        try:
            return self.hook_name(site, layer) in self.model.hook_dict
        except SelectionError:
            return False

    def hook_point(self, site: str, layer: int | None = None) -> nn.Module:
        name = self.hook_name(site, layer)
        if name not in self.model.hook_dict:
            raise SelectionError(f"{type(self.model).__name__} has no hook point {name!r} (site {site!r})")
        return self.model.hook_dict[name]

    def add_forward_hook(self, site: str, layer: int | None, fn: Any) -> Any:
        """Register a plain PyTorch forward hook ``fn(module, inputs, output)``; returns its handle."""
        return self.hook_point(site, layer).register_forward_hook(fn)

    @staticmethod
    def valid_from_scores(scores: Float[Tensor, "batch query_pos key_pos"]) -> Bool[Tensor, "batch query_pos key_pos"]:
        """Which score entries are not masked (this backend masks with −inf)."""
        return torch.isfinite(scores)

    # ------------------------------------------------------------------ selections and inputs
    def norm_layers(self, layers: int | Iterable[int] | None) -> list[int]:
        """A layer selection normalised against the attention layers (None = all; negatives count from the end)."""
        return select_layers(self.layers, layers)

    def norm_heads(self, heads: int | Sequence[int] | None, *, layer: int = 0) -> list[int]:
        n = self.layers[layer].n_heads if layer in self.layers and self.layers[layer].n_heads else self.n_heads
        return select_heads(n, heads, layer=layer)

    def to_tokens(self, text: str | list[str]) -> Int[Tensor, "batch pos"]:
        if self.tokenizer is None:
            raise InputError("got text but the model has no tokenizer; pass token ids Int[batch, pos]")
        return self.model.to_tokens(text, truncate=False)  # TL would truncate to n_ctx silently

    def as_tokens(self, tokens: Any) -> Int[Tensor, "batch pos"]:
        """Token ids ``[batch, pos]`` (int64) from ids of any integer dtype or text; checked against the vocabulary and n_ctx."""
        if isinstance(tokens, str) or (isinstance(tokens, list) and tokens and isinstance(tokens[0], str)):
            tokens = self.to_tokens(tokens)
        t = torch.as_tensor(tokens)
        if t.dim() == 1:
            t = t.unsqueeze(0)
        if t.dim() != 2 or t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
            raise InputError(f"tokens must be an integer tensor [batch, pos], got dtype {t.dtype} shape {tuple(t.shape)}")
        if t.numel() == 0:
            raise InputError("tokens are empty; expected token ids of shape [batch, pos]")
        if self.n_ctx is not None and t.shape[1] > self.n_ctx:
            raise InputError(f"tokens have {t.shape[1]} positions but the model's context is n_ctx={self.n_ctx}")
        vocab = self.d_vocab
        lo, hi = int(t.min()), int(t.max())
        if lo < 0 or (vocab is not None and hi >= vocab):
            raise InputError(f"token ids must lie in 0..{vocab - 1 if vocab else '?'} (d_vocab={vocab}); got range {lo}..{hi}")
        return t.long()

    def text_to_tokens(self, text: str | list[str]) -> tuple[Int[Tensor, "batch pos"], Tensor | None]:
        """Token ids of one string, or of a list of strings right-padded with their attention mask.

        Each string is tokenised alone (so padding never enters a sequence) and the mask marks the
        real tokens: pad tokens then enter neither the loss nor any statistic.
        """
        if isinstance(text, str):
            return self.to_tokens(text), None
        rows = [self.to_tokens(s)[0] for s in text]
        n = max(len(r) for r in rows)
        if all(len(r) == n for r in rows):
            return torch.stack(rows), None
        pad = getattr(self.tokenizer, "pad_token_id", None)
        pad = 0 if pad is None else int(pad)
        tokens = torch.full((len(rows), n), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), n), dtype=torch.long)
        for i, r in enumerate(rows):
            tokens[i, : len(r)] = r
            mask[i, : len(r)] = 1
        return tokens, mask

    def prepare_batch(self, inputs: Any, attention_mask: Tensor | None = None) -> Batch:
        """A :class:`Batch` on the model's device from a Batch, token ids, text or float inputs, checked."""
        access = self
        device = access.device
        if isinstance(inputs, Batch):
            if attention_mask is not None:
                raise InputError("give the attention mask inside the Batch, not beside it")
            batch = inputs
            inputs, attention_mask = batch.tokens, batch.attention_mask
        else:
            batch = None
        if isinstance(inputs, str) or (isinstance(inputs, list) and inputs and isinstance(inputs[0], str)):
            if attention_mask is not None:
                raise InputError("text input gets its attention mask from the tokenizer; do not pass one")
            inputs, attention_mask = access.text_to_tokens(inputs)
        if isinstance(inputs, np.ndarray):
            inputs = torch.from_numpy(inputs)
        if not isinstance(inputs, Tensor):
            raise InputError(f"inputs must be a tensor of token ids, a Batch or a string, got {type(inputs).__name__}")
        if not torch.is_floating_point(inputs):
            inputs = access.as_tokens(inputs)
        elif inputs.numel() == 0:
            raise InputError("inputs are empty; expected a float tensor of shape [batch, pos, d]")
        inputs = inputs.to(device)
        if attention_mask is not None:
            if not isinstance(attention_mask, Tensor) or tuple(attention_mask.shape) != tuple(inputs.shape[:2]):
                got = tuple(attention_mask.shape) if isinstance(attention_mask, Tensor) else type(attention_mask).__name__
                raise InputError(f"attention_mask must have shape {tuple(inputs.shape[:2])} (batch, pos), got {got}")
            attention_mask = attention_mask.to(device)
        if batch is None:
            return Batch(tokens=inputs, attention_mask=attention_mask)
        return replace(batch, tokens=inputs, attention_mask=attention_mask, labels=dict(batch.labels))



    # ------------------------------------------------------------------ weights
    def key_weights(self, layer: int) -> tuple[Float[Tensor, "kv_head d_model d_head"], Tensor | None]:
        """``W_K`` and ``b_K`` per kv head (unexpanded under GQA; ``b_K`` may be None)."""
        attn = self.model.blocks[layer].attn
        W = getattr(attn, "_W_K", None)
        b = getattr(attn, "_b_K", None)
        if W is None:
            W, b = attn.W_K, getattr(attn, "b_K", None)
        return W.detach(), (None if b is None else b.detach())

    def token_embedding(self) -> Float[Tensor, "d_vocab d_model"]:
        return self.model.W_E.detach()

    def key_layer_norm(self, layer: int) -> nn.Module | None:
        """The normalisation the attention's input goes through (None when there is none)."""
        ln = getattr(self.model.blocks[layer], "ln1", None)
        return None if ln is None or isinstance(ln, nn.Identity) else ln

    def unembed(self, resid_final: Float[Tensor, "... d_model"]) -> Float[Tensor, "... d_vocab"]:
        """Logits from the final normalised residual stream."""
        return self.model.unembed(resid_final)

    def final_norm(self, resid: Float[Tensor, "... d_model"]) -> Float[Tensor, "... d_model"]:
        """The final normalisation applied to a residual stream (the logit lens)."""
        ln = getattr(self.model, "ln_final", None)
        return resid if ln is None else ln(resid)


def model_access(model: Any) -> ModelAccess:
    """The model-access backend for ``model`` (a :class:`ModelAccess` is returned as is)."""
    if isinstance(model, ModelAccess):
        return model
    from .bridge import BridgeAccess, is_bridge  # TransformerLens 4 has no HookedTransformer

    if is_bridge(model):
        return BridgeAccess(model)
    return ModelAccess(model)
