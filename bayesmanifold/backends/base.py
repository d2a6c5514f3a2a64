"""The backend interface: everything bayesmanifold asks of a model, in one place.

Capture and every analysis ask a :class:`Backend` for what they need, by *site* (what a tensor
is, e.g. ``"pattern"`` or ``"resid_post"``): hook points, head counts, masks, attention scales,
the softmax's dtype, token ids from text, weights and parameter names. Each kind of model has one
backend (:mod:`.hooked`: ``HookedTransformer``; :mod:`.bridge`: ``TransformerBridge``), chosen by
:func:`bayesmanifold.backends.model_access`; no code outside this package reads a model's
config, tokenizer or modules.

Sites, with TransformerLens's shapes:

- per attention layer: ``q``, ``k`` (as they enter the dot product: after rotary when the model
  is rotary) ``[batch, pos, head, d_head]``, ``v`` ``[batch, pos, kv_head, d_head]``, ``z``
  ``[batch, pos, head, d_head]``, ``scores`` and ``pattern`` ``[batch, head, query_pos, key_pos]``;
- per block: ``resid_pre``, ``resid_post`` ``[batch, pos, d_model]``;
- per model: ``embed`` (the gradient leaf of capture), ``final`` (the final normalised residual,
  what the unembedding reads) ``[batch, pos, d_model]``.
"""

import contextlib
import copy
import io
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor, nn

from ..errors import InputError, ModelError, SelectionError
from .batch import Batch
from .loading import keep_global_rng
from .selection import select_heads, select_layers

__all__ = [
    "AttentionLayerInfo",
    "Backend",
    "ATTN_SITES",
    "BLOCK_SITES",
    "MODEL_SITES",
    "CORE_SITES",
    "SITE_ORDER",
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


class Backend:
    """What bayesmanifold knows about one kind of model: facts, sites, inputs, weights and loading.

    A backend wraps one model (``Backend(model)``) and answers by site, so that capture and every
    analysis work on any model some backend handles. A subclass says which models it handles
    (:meth:`handles`), discovers the attention layers in ``__init__`` (filling :attr:`layers`),
    and overrides what differs for its kind; its classmethods build and load models of that kind.
    The registry (:mod:`.registry`) lists the backends: a new one is one file plus one line there.

    Attributes:
        model: the wrapped model.
        cfg: its config (TransformerLens's field names: n_layers, n_heads, d_head, ...).
        layers: the attention layers capture can read, with their static facts.
    """

    #: the backend's name, as results and errors report it
    name: ClassVar[str] = "base"
    #: site -> hook point name inside ``blocks.{layer}`` (rotary q/k are read at ``hook_rot_*``)
    SITE_NAMES: ClassVar[dict[str, str]] = _TL_NAME
    #: the embedding output's hook point: where capture starts the gradient path
    EMBED_HOOK: ClassVar[str] = "hook_embed"
    #: the final normalised residual's hook point
    FINAL_HOOK: ClassVar[str] = "ln_final.hook_normalized"
    #: The dtype the softmax is taken in, when it differs from the model's (None: the model's).
    softmax_dtype: torch.dtype | None = None

    model: nn.Module
    cfg: Any
    layers: dict[int, AttentionLayerInfo]

    def __init__(self, model: nn.Module) -> None:  # pragma: no cover - every backend has its own
        raise NotImplementedError(f"{type(self).__name__} must discover the model's attention layers")

    def __repr__(self) -> str:
        return f"<{self.name} backend: {type(self.model).__name__}, {len(self.layers)} attention layers>"

    # ------------------------------------------------------------------ which models; building and loading
    @classmethod
    def handles(cls, model: object) -> bool:
        """Whether this backend handles ``model`` (the registry asks each backend in turn)."""
        return False

    @classmethod
    def available(cls) -> bool:
        """Whether the installed libraries can build and load models of this kind."""
        return False

    @classmethod
    def build(cls, fields: dict[str, Any], *, seed: int, device: str | torch.device, dtype: torch.dtype,
              tokenizer: Any = None) -> nn.Module:
        """A freshly initialised model from HookedTransformerConfig fields, its weights drawn from
        the global generator seeded with ``seed`` (the registry calls it inside ``keep_global_rng``)."""
        raise NotImplementedError(f"the {cls.name} backend cannot build a model from a config")

    @classmethod
    def load_hf(cls, path: Path, *, dtype: torch.dtype, tokenizer: Any = None) -> nn.Module:
        """The HuggingFace causal LM saved in ``path``, with no network; ``tokenizer`` None: it has none."""
        raise NotImplementedError(f"the {cls.name} backend cannot load HuggingFace directories")

    @classmethod
    def load_named(cls, name: str, *, device: str, dtype: torch.dtype) -> nn.Module:
        """A pretrained model by name (needs the hub)."""
        raise NotImplementedError(f"the {cls.name} backend cannot load models by name")

    def load_state_dict(self, sd: Any, where: str) -> None:
        """Load ``sd`` (read from ``where``; either checkpoint format) into the model, in its dtypes."""
        raise NotImplementedError(f"the {self.name} backend cannot load state dicts")

    def config_fields(self) -> dict[str, Any]:
        """The model's config as HookedTransformerConfig fields (what :meth:`build` takes)."""
        raise NotImplementedError(f"the {self.name} backend has no HookedTransformer config")

    def fresh_copy(self, seed: int = 0) -> nn.Module:
        """A newly initialised model with this one's config, on the CPU (global RNGs left as found)."""
        with contextlib.redirect_stdout(io.StringIO()), keep_global_rng():
            return type(self).build(self.config_fields(), seed=seed, device="cpu", dtype=self.dtype)

    def in_dtype(self, dtype: torch.dtype) -> nn.Module:
        """The model in ``dtype``: itself when it already is, else a converted deep copy (the
        user's model is never converted in place)."""
        if self.dtype == dtype:
            return self.model
        m = copy.deepcopy(self.model).to(dtype)
        cfg = getattr(m, "cfg", None)
        if cfg is not None and hasattr(cfg, "dtype"):
            cfg.dtype = dtype
        return m

    def parameter_names(self, kind: str, layers: Sequence[int] | None = None) -> list[str]:
        """Names of the floating-point parameters of one kind: ``"all"``, attention ``"qk"`` or
        ``"values"`` (restricted to ``layers``; None: all); may be empty."""
        return [n for n, p in self.model.named_parameters() if torch.is_floating_point(p)] if kind == "all" else []

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
        """The dtype of the model's floating-point weights (float32 when it has none)."""
        return next((p.dtype for p in self.model.parameters() if p.is_floating_point()), torch.float32)

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
            return self.EMBED_HOOK
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

    def embed_point(self) -> nn.Module | None:
        """The embedding output's hook point (where capture starts the gradient path), or None."""
        return self.model.hook_dict.get(self.EMBED_HOOK)

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

    @property
    def text_encoding(self) -> str | None:
        """How text becomes token ids: ``"tokenizer"``, ``"utf8-bytes"`` (no tokenizer, but the
        vocabulary covers the 256 byte values, as our byte-level models) or None (it cannot)."""
        if self.tokenizer is not None:
            return "tokenizer"
        return "utf8-bytes" if (self.d_vocab or 0) >= 256 else None

    def _no_text(self) -> InputError:
        return InputError(
            f"got text but the model has no tokenizer (and its vocabulary of {self.d_vocab} does not cover the "
            "256 byte values); give token ids, or a tokenizer: --tokenizer DIR on the command line, "
            "load_model(..., tokenizer=DIR) in the library"
        )

    def to_tokens(self, text: str | list[str]) -> Int[Tensor, "batch pos"]:
        """Token ids of text through the model's tokenizer (TransformerLens's ``to_tokens``, never truncated)."""
        if self.tokenizer is None:
            raise self._no_text()
        return self.model.to_tokens(text, truncate=False)  # TL would truncate to n_ctx silently

    def encode(self, text: str) -> Int[Tensor, " pos"]:
        """Token ids ``[pos]`` (int64, CPU) of one text: the tokenizer's (with its BOS, as
        ``to_tokens``), else the UTF-8 bytes for a byte-vocabulary model (:attr:`text_encoding`).

        Raises:
            InputError: the model can read neither (no tokenizer, vocabulary under 256).
        """
        how = self.text_encoding
        if how == "tokenizer":
            return self.to_tokens(text)[0].cpu().long()
        if how == "utf8-bytes":
            return torch.frombuffer(bytearray(text.encode("utf-8")), dtype=torch.uint8).long()
        raise self._no_text()

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
            return self.encode(text)[None].to(self.device), None
        rows = [self.encode(s) for s in text]
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
        """``W_K`` ``[kv_head, d_model, d_head]`` (unexpanded under GQA) and ``b_K`` (None without a bias)."""
        attn = self.model.blocks[layer].attn
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


