"""Getting a TransformerLens model: a toy one, a local HuggingFace directory (offline), or by name.

Loading from a local directory follows the recipe in DESIGN.md: the HF config is converted with
TransformerLens's own converter, and the weights are loaded without folding layer norms or
centring, so internals match HuggingFace (logits agree to ~1e-6 in float32).
"""

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import CheckpointError, ModelError

__all__ = ["load_model", "load_hf_directory", "toy_model", "parse_dtype", "load_fitting_state_dict"]

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
    """A small randomly initialised ``HookedTransformer`` (seeded; vocabulary = bytes by default)."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    dt = parse_dtype(dtype)
    _check_device_dtype(device, dt)
    cfg = HookedTransformerConfig(
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
        seed=seed,
        device=device,
        dtype=dt,
    )
    return HookedTransformer(cfg).eval()


def load_hf_directory(path: str | os.PathLike, *, device: str = "cpu", dtype: str | torch.dtype = "float32"):
    """Load a HuggingFace causal LM saved with ``save_pretrained`` from ``path``, with no network.

    Raises:
        ModelError: the directory does not exist, holds no config/weights, or holds an
            architecture TransformerLens cannot convert.
    """
    from transformer_lens import HookedTransformer, HookedTransformerConfig
    from transformer_lens import loading_from_pretrained as loading

    p = Path(path)
    if not p.is_dir():
        raise ModelError(f"model directory {str(p)!r} does not exist")
    if not (p / "config.json").is_file():
        raise ModelError(f"{str(p)!r} holds no config.json; expected a directory written by save_pretrained")
    dt = parse_dtype(dtype)
    _check_device_dtype(device, dt)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        cfg_dict = loading.convert_hf_model_config(str(p))
    except (NotImplementedError, ValueError, KeyError) as exc:
        raise ModelError(f"{str(p)!r} holds an architecture TransformerLens cannot convert: {exc}") from None
    try:
        hf = AutoModelForCausalLM.from_pretrained(str(p), torch_dtype=dt)
    except (OSError, ValueError) as exc:
        raise ModelError(f"could not load the weights in {str(p)!r}: {exc}") from None
    try:
        tok = AutoTokenizer.from_pretrained(str(p))
    except (OSError, ValueError, TypeError):
        tok = None
    if tok is None:
        # No tokenizer saved: stop TransformerLens from trying to load one by name (2.x does).
        cfg_dict = {**cfg_dict, "tokenizer_name": None}
    cfg = HookedTransformerConfig.from_dict({**cfg_dict, "device": device, "dtype": dt})
    model = HookedTransformer(cfg, tokenizer=tok)
    state = loading.get_pretrained_state_dict(str(p), cfg, hf_model=hf, dtype=dt)
    model.load_and_process_state_dict(
        state, fold_ln=False, center_writing_weights=False, center_unembed=False, fold_value_biases=False
    )
    del hf
    return model.to(device).eval()


def load_model(spec: str, *, device: str = "cpu", dtype: str | torch.dtype = "float32", seed: int = 0):
    """Load a model from a spec: ``"toy"``, a local HuggingFace directory, or a pretrained name.

    A name (e.g. ``"gpt2"``) uses ``HookedTransformer.from_pretrained_no_processing`` and needs
    network access to the hub.
    """
    if spec == "toy":
        return toy_model(device=device, dtype=dtype, seed=seed)
    if os.path.sep in spec or spec.startswith(".") or Path(spec).exists():
        return load_hf_directory(spec, device=device, dtype=dtype)
    from transformer_lens import HookedTransformer

    dt = parse_dtype(dtype)
    _check_device_dtype(device, dt)
    try:
        return HookedTransformer.from_pretrained_no_processing(spec, device=device, dtype=dt).eval()
    except Exception as exc:  # the hub raises many types (network, unknown name)
        raise ModelError(
            f"could not load pretrained model {spec!r} ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); "
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
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    d = model.cfg.to_dict()
    d.update(seed=None, init_weights=True, device="cpu")
    cfg = HookedTransformerConfig.from_dict(d)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return HookedTransformer(cfg)
