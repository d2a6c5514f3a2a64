"""Getting a TransformerLens model: a toy one, a local HuggingFace directory (offline), or by name.

Loading from a local directory: the directory's own config.json is converted with
TransformerLens's converter (from a neutral path, so that the directory's name cannot select a
built-in config), and the weights are loaded without folding layer norms or centring, so
internals match HuggingFace (logits agree to ~1e-6 in float32).

This module and the rest of ``hooks`` are the only code that imports TransformerLens: models are
built here (:func:`build_hooked`, seeded locally; the global torch, numpy and Python RNGs are left
as found).
"""

import contextlib
import io
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import CheckpointError, ModelError
from . import bridge_loading

__all__ = [
    "load_model",
    "load_hf_directory",
    "hf_config_dict",
    "load_tokenizer",
    "toy_model",
    "build_hooked",
    "library_versions",
    "parse_dtype",
    "load_fitting_state_dict",
]

_DTYPES = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16, "bfloat16": torch.bfloat16}


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """Accept ``"float32"``, ``"float64"``, ``"float16"``, ``"bfloat16"`` or a torch dtype."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise ModelError(f"unknown dtype {dtype!r}; accepted: {', '.join(_DTYPES)}")
    return _DTYPES[dtype]


def _check_device_dtype(device: str, dtype: torch.dtype) -> None:
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ModelError("device 'cuda' was asked for but no CUDA GPU is available; use --device cpu")
    if dev.type == "cpu" and dtype == torch.float16:
        raise ModelError("float16 is not supported for capture on CPU (slow or missing kernels); use float32, float64 or bfloat16")


@contextlib.contextmanager
def keep_global_rng():
    """Restore the global torch (CPU), numpy and Python RNG states on exit.

    Building a model draws from the torch RNG, and importing TransformerLens 2.x (through
    ``datasets``) draws from Python's ``random``: the library leaves all three as it found them.
    """
    import random

    import numpy as np

    py_state, np_state = random.getstate(), np.random.get_state()
    try:
        with torch.random.fork_rng(devices=[]):
            yield
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)


def build_hooked(
    cfg: dict[str, Any],
    *,
    seed: int = 0,
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype | None = None,
    tokenizer: Any = None,
):
    """A freshly initialised ``HookedTransformer`` from ``HookedTransformerConfig`` fields.

    The weights are drawn on the CPU from a generator seeded with ``seed`` inside
    ``torch.random.fork_rng``, then moved to ``device``: the global torch, numpy and Python RNGs
    are left as found (TransformerLens's ``seed=`` config field would reseed all three, so it is
    not used), and the weights do not depend on the device.

    Args:
        cfg: config fields, e.g. ``{"n_layers": 2, "d_model": 64, ...}``; ``device``, ``dtype``
            and ``seed`` entries are overridden.
        seed: seed of the initialisation.
        device: where the model ends up.
        dtype: the weights' dtype (default: ``cfg["dtype"]`` or float32).
        tokenizer: passed to ``HookedTransformer``.

    Example:
        >>> model = build_hooked({"n_layers": 1, "d_model": 16, "n_heads": 2, "d_head": 8,
        ...                       "d_vocab": 10, "n_ctx": 8, "act_fn": "gelu"}, seed=3)
    """
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ModelError(f"seed must be an int; got {seed!r}")
    fields = dict(cfg)
    if dtype is not None:
        fields["dtype"] = parse_dtype(dtype)
    fields.update(seed=None, device="cpu")
    # TransformerLens prints "Moving model to device" on build and .to(); keep stdout clean.
    with contextlib.redirect_stdout(io.StringIO()), keep_global_rng():
        if not bridge_loading.hooked_available():  # TransformerLens 4: the native bridge, the same weights
            dt = parse_dtype(fields.get("dtype") or torch.float32)
            return bridge_loading.build_native(fields, seed=seed, device=device, dtype=dt, tokenizer=tokenizer)
        from transformer_lens import HookedTransformer, HookedTransformerConfig

        torch.random.default_generator.manual_seed(seed)
        model = HookedTransformer(HookedTransformerConfig(**fields), tokenizer=tokenizer)
        if torch.device(device).type != "cpu":
            model = model.to(device)
    return model


def library_versions() -> dict[str, str]:
    """The installed torch and TransformerLens versions (recorded in checkpoints)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        tl = version("transformer-lens")
    except PackageNotFoundError:  # pragma: no cover
        tl = "unknown"
    return {"torch": torch.__version__, "transformer_lens": tl}


def toy_model(
    *,
    n_layers: int = 2,
    n_heads: int = 4,
    d_model: int = 64,
    d_vocab: int = 256,
    n_ctx: int = 128,
    n_key_value_heads: int | None = None,
    positional_embedding_type: str = "standard",
    attn_only: bool = False,
    seed: int = 0,
    device: str = "cpu",
    dtype: str | torch.dtype = "float32",
):
    """A small randomly initialised ``HookedTransformer`` (seeded; vocabulary = bytes by default).

    The global random state is left as found (see :func:`build_hooked`).
    """
    dt = parse_dtype(dtype)
    _check_device_dtype(device, dt)
    cfg = dict(
        n_layers=n_layers,
        d_model=d_model,
        n_heads=n_heads,
        d_head=d_model // n_heads,
        d_mlp=None if attn_only else 4 * d_model,
        d_vocab=d_vocab,
        n_ctx=n_ctx,
        act_fn="gelu",
        normalization_type="LN",
        attn_only=attn_only,
        n_key_value_heads=n_key_value_heads,
        positional_embedding_type=positional_embedding_type,
        rotary_dim=(d_model // n_heads) if positional_embedding_type == "rotary" else None,
    )
    return build_hooked(cfg, seed=seed, device=device, dtype=dt).eval()


# Substrings of a model name that make TransformerLens's converter take a name-based branch
# (built-in configs of official checkpoints) instead of reading the directory's config.json.
_NAME_TRIGGERS = ("llama", "gemma", "wav2vec2", "santacoder")


@contextlib.contextmanager
def _neutral_config_dir(config: dict[str, Any]):
    """A temporary directory whose path no name-based branch matches, holding ``config``."""
    for parent in (None, "/tmp", "/var/tmp", os.getcwd()):
        try:
            d = Path(tempfile.mkdtemp(prefix="bm-config-", dir=parent))
        except OSError:
            continue
        if not any(w in str(d).lower() for w in _NAME_TRIGGERS):
            try:
                (d / "config.json").write_text(json.dumps(config), encoding="utf-8")
                yield d
            finally:
                shutil.rmtree(d, ignore_errors=True)
            return
        shutil.rmtree(d, ignore_errors=True)
    raise ModelError(
        f"could not create a temporary directory whose path avoids {_NAME_TRIGGERS} (TransformerLens "
        "reads those as model names); set TMPDIR to another directory"
    )


def load_tokenizer(directory: str | os.PathLike) -> Any:
    """The HuggingFace tokenizer saved in ``directory`` (e.g. a checkpoint's ``tokenizer/``), read
    with no network."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
    except (OSError, ValueError, TypeError, KeyError) as exc:
        raise ModelError(f"cannot read the tokenizer in {str(directory)!r}: {_first_line(exc)}") from None


def hf_config_dict(path: str | os.PathLike) -> dict[str, Any]:
    """TransformerLens's config fields for the model saved in ``path``, from its own config.json.

    TransformerLens's converter picks built-in configs when the *name* it is given contains
    "llama" or "gemma", whatever the directory holds, so the directory's config.json is converted
    from a neutral temporary path. A config without ``n_ctx`` but with ``n_positions`` (GPT-2 as
    current transformers saves it) gets ``n_ctx = n_positions``.
    """
    from transformer_lens import loading_from_pretrained as loading
    from transformers import AutoConfig

    p = Path(path)
    try:
        raw = json.loads((p / "config.json").read_text(encoding="utf-8"))
        hf_cfg = AutoConfig.from_pretrained(str(p), local_files_only=True)
    except (OSError, ValueError, KeyError) as exc:
        raise ModelError(f"cannot read the config in {str(p)!r}: {exc}") from None
    if not isinstance(raw, dict):
        raise ModelError(f"{str(p / 'config.json')!r} does not hold a JSON object")
    if getattr(hf_cfg, "n_ctx", None) is None and getattr(hf_cfg, "n_positions", None) is not None:
        raw["n_ctx"] = int(hf_cfg.n_positions)
    with _neutral_config_dir(raw) as alias:
        try:
            cfg = loading.convert_hf_model_config(str(alias), local_files_only=True)
        except (NotImplementedError, ValueError, KeyError, AttributeError, TypeError, IndexError) as exc:
            raise ModelError(
                f"{str(p)!r} holds an architecture TransformerLens cannot convert "
                f"({type(exc).__name__}: {exc})"
            ) from None
    return {**cfg, "tokenizer_name": str(p)}


def load_hf_directory(path: str | os.PathLike, *, device: str = "cpu", dtype: str | torch.dtype = "float32"):
    """Load a HuggingFace causal LM saved with ``save_pretrained`` from ``path``, with no network.

    The directory may have any name (see :func:`hf_config_dict`); nothing is downloaded, and the
    global random state is left as found.

    Raises:
        ModelError: the directory does not exist, holds no config/weights, or holds an
            architecture TransformerLens cannot convert.
    """
    p = Path(path)
    if p.is_file():
        raise ModelError(f"{str(p)!r} is a file; expected a model directory written by save_pretrained")
    if not p.is_dir():
        raise ModelError(f"model directory {str(p)!r} does not exist")
    if not (p / "config.json").is_file():
        raise ModelError(f"{str(p)!r} holds no config.json; expected a directory written by save_pretrained")
    dt = parse_dtype(dtype)
    _check_device_dtype(device, dt)
    with keep_global_rng():
        model = _load_hf(p, dt)
    with contextlib.redirect_stdout(io.StringIO()):
        return model.to(device).eval()


def _load_hf(p: Path, dt: torch.dtype):
    if not bridge_loading.hooked_available():  # TransformerLens 4: a bridge over the HF module
        return bridge_loading.load_hf_bridge(p, dtype=dt)
    from transformer_lens import loading_from_pretrained as loading
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cfg_dict = hf_config_dict(p)
    try:
        hf = AutoModelForCausalLM.from_pretrained(str(p), torch_dtype=dt, local_files_only=True)
    except Exception as exc:  # noqa: BLE001 - missing, corrupt or foreign weight files raise many types
        raise ModelError(f"could not load the weights in {str(p)!r}: {type(exc).__name__}: {_first_line(exc)}") from None
    try:
        tok = AutoTokenizer.from_pretrained(str(p), local_files_only=True)
    except (OSError, ValueError, TypeError):
        tok = None
    if tok is None:
        # No tokenizer saved: stop TransformerLens from trying to load one by name (2.x does).
        cfg_dict = {**cfg_dict, "tokenizer_name": None}
    model = build_hooked(cfg_dict, device="cpu", dtype=dt, tokenizer=tok)
    try:
        state = loading.get_pretrained_state_dict(str(p), model.cfg, hf_model=hf, dtype=dt)
        model.load_and_process_state_dict(
            state, fold_ln=False, center_writing_weights=False, center_unembed=False, fold_value_biases=False
        )
    except (RuntimeError, KeyError, ValueError, TypeError, AttributeError) as exc:  # weights that do not fit the config
        raise ModelError(f"the weights in {str(p)!r} do not fit its config: {type(exc).__name__}: {_first_line(exc)}") from None
    return model


def _first_line(exc: BaseException, limit: int = 300) -> str:
    """The first line of an exception's message, cut to ``limit`` characters (some list thousands of names)."""
    text = str(exc).splitlines()[0] if str(exc) else ""
    return text if len(text) <= limit else text[: limit - 1] + "…"


def load_model(spec: str, *, device: str = "cpu", dtype: str | torch.dtype = "float32", seed: int = 0):
    """Load a model from a spec: ``"toy"``, a local HuggingFace directory, or a pretrained name.

    A name (e.g. ``"gpt2"``) uses ``HookedTransformer.from_pretrained_no_processing`` and needs
    network access to the hub.
    """
    if spec == "toy":
        return toy_model(device=device, dtype=dtype, seed=seed)
    if os.path.sep in spec or spec.startswith(".") or Path(spec).exists():
        return load_hf_directory(spec, device=device, dtype=dtype)
    dt = parse_dtype(dtype)
    _check_device_dtype(device, dt)
    if not bridge_loading.hooked_available():
        with keep_global_rng():
            return bridge_loading.load_named_bridge(spec, device=device, dtype=dt)
    try:
        with keep_global_rng():
            from transformer_lens import HookedTransformer

            return HookedTransformer.from_pretrained_no_processing(spec, device=device, dtype=dt).eval()
    except Exception as exc:  # the hub raises many types (network, unknown name)
        raise ModelError(
            f"could not load pretrained model {spec!r} ({type(exc).__name__}: {_first_line(exc)}); "
            "accepted: 'toy', a local HuggingFace directory, or a TransformerLens model name (needs network)"
        ) from None


def load_fitting_state_dict(model: nn.Module, sd: Any, where: str) -> None:
    """Load the state dict ``sd`` (read from ``where``) into ``model``, in the model's dtypes.

    Every parameter must be present with the model's shape, else :class:`CheckpointError`.
    Buffers (TransformerLens's causal masks, IGNORE) are derived from the config and differ
    between TransformerLens versions (3.x stores an empty mask): the model keeps its own unless
    the stored one has the same shape.
    """
    if not isinstance(sd, dict):
        raise CheckpointError(f"{where} is not a state dict")
    from .bridge import is_bridge

    if is_bridge(model):  # TransformerLens 4 (either format of state dict)
        return bridge_loading.load_bridge_state_dict(model, sd, where)
    if any(k.endswith(".q.weight") for k in sd):  # written by a native bridge: HookedTransformer keys
        sd = bridge_loading.to_hooked_state_dict(sd, model.cfg)
    ref = model.state_dict()
    params = {k for k, _ in model.named_parameters()}
    missing = sorted(params - set(sd))
    wrong = sorted(k for k in params & set(sd) if tuple(sd[k].shape) != tuple(ref[k].shape))
    if missing or wrong:
        raise CheckpointError(
            f"{where} does not fit the model: missing {missing[:5]}, "
            f"wrong shapes {[(k, tuple(sd[k].shape), tuple(ref[k].shape)) for k in wrong[:5]]}"
        )
    keep = {k: v.to(ref[k].dtype) for k, v in sd.items()
            if k in params or (k in ref and torch.is_tensor(v) and tuple(v.shape) == tuple(ref[k].shape))}
    model.load_state_dict(keep, strict=False)


def fresh_like(model: Any, seed: int = 0) -> Any:
    """A newly initialised ``HookedTransformer`` with ``model``'s config, on CPU.

    Seeded inside ``torch.random.fork_rng``: the global RNG is left as found (TransformerLens's
    ``seed=`` config field would reseed it, so it is cleared).
    """
    from .bridge import is_bridge

    if is_bridge(model):
        return build_hooked(bridge_loading.hooked_fields(model.cfg), seed=seed, dtype=model.cfg.dtype)
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    d = model.cfg.to_dict()
    d.update(seed=None, init_weights=True, device="cpu")
    cfg = HookedTransformerConfig.from_dict(d)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return HookedTransformer(cfg)
