"""The model boundary: the only code that knows a kind of model.

:class:`Backend` (:mod:`.base`) is the interface capture and every analysis use; :mod:`.hooked`
(``HookedTransformer``, TransformerLens 2.18 and 3.x) and :mod:`.bridge` (``TransformerBridge``,
HuggingFace-backed and native) implement it; :mod:`.registry` lists them and opens models
(:func:`model_access`, :func:`load_model`). A new backend is one file plus one line in
:data:`~.registry.BACKENDS`. The values both this layer and the engine use (the :class:`Batch`,
head and layer selections) live here too, so no import runs from here up into the engine.
"""

from .base import (
    ATTN_SITES,
    BLOCK_SITES,
    CORE_SITES,
    MODEL_SITES,
    SITE_ORDER,
    AttentionLayerInfo,
    Backend,
)
from .batch import Batch, Positions, position_mask
from .loading import DTYPE_NAMES, keep_global_rng, library_versions, load_tokenizer, parse_dtype
from .registry import (
    BACKENDS,
    MODEL_SPECS,
    ModelLike,
    build_model,
    load_hf_directory,
    load_model,
    model_access,
    toy_model,
)
from .selection import select_heads, select_layers

__all__ = [
    "ATTN_SITES",
    "BACKENDS",
    "BLOCK_SITES",
    "CORE_SITES",
    "DTYPE_NAMES",
    "MODEL_SITES",
    "MODEL_SPECS",
    "SITE_ORDER",
    "AttentionLayerInfo",
    "Backend",
    "Batch",
    "ModelLike",
    "Positions",
    "build_model",
    "keep_global_rng",
    "library_versions",
    "load_hf_directory",
    "load_model",
    "load_tokenizer",
    "model_access",
    "parse_dtype",
    "position_mask",
    "select_heads",
    "select_layers",
    "toy_model",
]
