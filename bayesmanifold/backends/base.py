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
import weakref
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from jaxtyping import Bool, Float
from torch import Tensor, nn

from ..errors import ModelError, SelectionError
from .inputs import InputsMixin
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


class Backend(InputsMixin):
    """What bayesmanifold knows about one kind of model: facts, sites, inputs, weights and loading.

    A backend wraps one model (``Backend(model)``) and answers by site, so that capture and every
    analysis work on any model some backend handles. A subclass says which models it handles
    (:meth:`handles`), discovers the attention layers in ``__init__`` (filling :attr:`layers`),
    and overrides what differs for its kind; its classmethods build and load models of that kind.
    The registry (:mod:`.registry`) lists the backends: a new one is one file plus one line there.

    Attributes:
        model: the wrapped model, held by a weak reference: the registry caches one backend per
            model for as long as the model lives, and a backend must not keep it alive (a loop
            over checkpoints would keep every one in memory). Keep the model while you use its
            backend.
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

    cfg: Any
    layers: dict[int, AttentionLayerInfo]
    _model_ref: "weakref.ReferenceType[nn.Module]"

    @property
    def model(self) -> nn.Module:
        model = self._model_ref()
        if model is None:
            raise ModelError(f"the model of this {self.name} backend has been deleted; keep a reference to the model "
                             "while you use its backend")
        return model

    @model.setter
    def model(self, model: nn.Module) -> None:
        self._model_ref = weakref.ref(model)

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

    # ------------------------------------------------------------------ selections
    def norm_layers(self, layers: int | Iterable[int] | None) -> list[int]:
        """A layer selection normalised against the attention layers (None = all; negatives count from the end)."""
        return select_layers(self.layers, layers)

    def norm_heads(self, heads: int | Sequence[int] | None, *, layer: int = 0) -> list[int]:
        n = self.layers[layer].n_heads if layer in self.layers and self.layers[layer].n_heads else self.n_heads
        return select_heads(n, heads, layer=layer)

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


