"""Loading on TransformerLens 4, where models are ``TransformerBridge``s (there is no HookedTransformer).

- Our presets, toys and checkpoints: :func:`build_native` boots TransformerLens's native model
  (``boot_native``) from the same config fields a ``HookedTransformer`` takes, with the
  HookedTransformer's initialisation replayed draw for draw (normal(0, initializer_range) for every
  ``W_`` matrix in its parameter order, biases 0, norm scales 1), so a seed gives the same weights
  on every TransformerLens version. State dicts move between the two formats in both directions
  (:func:`to_bridge_state_dict`, :func:`to_hooked_state_dict`): checkpoints are written in the
  HookedTransformer format and load on 2.18, 3.x and 4.x with the same logits.
- A local HuggingFace directory: ``boot_transformers`` with no network (eager attention).
- A name: ``boot_transformers(name)`` (needs the hub).

This module imports TransformerLens 4's bridge modules only inside functions.
"""

import contextlib
import io
import math
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import CheckpointError, ModelError
from .loading import first_line

__all__ = [
    "hooked_available",
    "hooked_fields",
    "bridge_config",
    "hooked_init_state_dict",
    "build_native",
    "to_bridge_state_dict",
    "to_hooked_state_dict",
    "load_bridge_state_dict",
    "load_hf_bridge",
    "load_named_bridge",
]

# HookedTransformerConfig fields a native bridge reads (others, e.g. tokenizer_name, are dropped).
_FIELDS = (
    "n_layers", "d_model", "n_heads", "d_head", "d_mlp", "d_vocab", "n_ctx", "act_fn", "eps",
    "normalization_type", "positional_embedding_type", "rotary_dim", "rotary_base", "attn_only",
    "n_key_value_heads", "default_prepend_bos", "use_attn_scale", "attn_scale", "final_rms",
    "gated_mlp", "original_architecture", "d_vocab_out", "tokenizer_prepends_bos",
)


def hooked_available() -> bool:
    """Whether the installed TransformerLens has ``HookedTransformer`` (2.18 and 3.x; 4.0 removed it)."""
    try:
        from transformer_lens import HookedTransformer  # noqa: F401
    except ImportError:
        return False
    return True


def hooked_fields(cfg: Any) -> dict[str, Any]:
    """The HookedTransformer config fields of a bridge's config (what :func:`build_native` takes)."""
    return {k: getattr(cfg, k) for k in _FIELDS if getattr(cfg, k, None) is not None or k == "normalization_type"}


# Fields that do not change the function a model computes (or that build_native handles itself).
_IGNORED = {"dtype", "device", "seed", "init_weights", "tokenizer_name", "initializer_range", "model_name", "n_devices"}


def bridge_config(fields: dict[str, Any], dtype: torch.dtype | None = None) -> Any:
    """A ``TransformerBridgeConfig`` from ``HookedTransformerConfig`` fields (as a dict).

    Raises:
        ModelError: a field the native model has no equivalent of is set (e.g. ``use_attention_sinks``):
            it is refused, never dropped.
    """
    from transformer_lens.config import TransformerBridgeConfig

    unknown = sorted(k for k, v in fields.items() if k not in _FIELDS and k not in _IGNORED and v is not None and v is not False)
    if unknown or fields.get("init_mode", "gpt2") != "gpt2":
        raise ModelError(
            f"TransformerLens's native model (TransformerLens 4) has no equivalent of {unknown or ['init_mode']}; "
            f"supported fields: {', '.join(_FIELDS)}"
        )
    d = {k: v for k, v in fields.items() if k in _FIELDS and (v is not None or k == "normalization_type")}
    d.pop("original_architecture", None)
    if d.get("attn_only"):
        d.pop("d_mlp", None)
    if "d_head" not in d and "d_model" in d and "n_heads" in d:
        d["d_head"] = d["d_model"] // d["n_heads"]
    try:
        return TransformerBridgeConfig(**d, seed=None, device="cpu", dtype=dtype or torch.float32)
    except (TypeError, ValueError) as exc:
        raise ModelError(f"cannot build a TransformerLens native model from {sorted(d)}: {exc}") from None


def _norm_keys(prefix: str, kind: str | None) -> list[tuple[str, str]]:
    """(HookedTransformer key, init) of one norm: LN has w and b, RMS only w, the Pre kinds none."""
    k = (kind or "").upper()
    if k == "LN":
        return [(f"{prefix}.w", "ones"), (f"{prefix}.b", "zeros")]
    if k == "RMS":
        return [(f"{prefix}.w", "ones")]
    return []


def _hooked_layout(cfg: Any) -> list[tuple[str, tuple[int, ...], str]]:
    """The parameters of a HookedTransformer with ``cfg``, in its ``named_parameters`` order."""
    D, H, d, V = cfg.d_model, cfg.n_heads, cfg.d_head, cfg.d_vocab
    kv = cfg.n_key_value_heads or H
    gqa = "_" if cfg.n_key_value_heads and cfg.n_key_value_heads != H else ""
    norm = cfg.normalization_type
    shapes = {"w": (D,), "b": (D,)}
    out: list[tuple[str, tuple[int, ...], str]] = [("embed.W_E", (V, D), "normal")]
    if (cfg.positional_embedding_type or "standard") == "standard":
        out.append(("pos_embed.W_pos", (cfg.n_ctx, D), "normal"))
    for layer in range(cfg.n_layers):
        p = f"blocks.{layer}"
        out += [(k, shapes[k[-1]], init) for k, init in _norm_keys(f"{p}.ln1", norm)]
        if not cfg.attn_only:
            out += [(k, shapes[k[-1]], init) for k, init in _norm_keys(f"{p}.ln2", norm)]
        out += [
            (f"{p}.attn.W_Q", (H, D, d), "normal"), (f"{p}.attn.W_O", (H, d, D), "normal"),
            (f"{p}.attn.b_Q", (H, d), "zeros"), (f"{p}.attn.b_O", (D,), "zeros"),
            (f"{p}.attn.{gqa}W_K", (kv, D, d), "normal"), (f"{p}.attn.{gqa}W_V", (kv, D, d), "normal"),
            (f"{p}.attn.{gqa}b_K", (kv, d), "zeros"), (f"{p}.attn.{gqa}b_V", (kv, d), "zeros"),
        ]
        if not cfg.attn_only:
            m = cfg.d_mlp
            out += [(f"{p}.mlp.W_in", (D, m), "normal"), (f"{p}.mlp.b_in", (m,), "zeros"),
                    (f"{p}.mlp.W_out", (m, D), "normal"), (f"{p}.mlp.b_out", (D,), "zeros")]
    out += [(k, shapes[k[-1]], init) for k, init in _norm_keys("ln_final", norm)]
    out += [("unembed.W_U", (D, V), "normal"), ("unembed.b_U", (V,), "zeros")]
    return out


def hooked_init_state_dict(cfg: Any, dtype: torch.dtype, initializer_range: float | None = None) -> dict[str, torch.Tensor]:
    """A HookedTransformer's fresh weights for ``cfg``, drawn as ``HookedTransformer(cfg)`` draws them.

    GPT-2 initialisation (TransformerLens's default): every ``W_`` matrix, in parameter order,
    from the global generator, ``normal(0, initializer_range)`` with ``0.8 / sqrt(d_model)`` by
    default. The caller seeds (and restores) the generator.
    """
    std = initializer_range if initializer_range and initializer_range > 0 else 0.8 / math.sqrt(cfg.d_model)
    sd: dict[str, torch.Tensor] = {}
    for key, shape, init in _hooked_layout(cfg):
        t = torch.empty(shape, dtype=dtype)
        if init == "normal":
            t.normal_(0.0, std)
        else:
            t.fill_(1.0 if init == "ones" else 0.0)
        sd[key] = t
    return sd


def build_native(
    fields: dict[str, Any],
    *,
    seed: int = 0,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    tokenizer: Any = None,
    state_dict: dict[str, torch.Tensor] | None = None,
):
    """A ``boot_native`` bridge with a HookedTransformer's config fields and its seeded initialisation.

    Draws from the global generator seeded with ``seed``: call it inside ``keep_global_rng``.
    ``state_dict`` (either format) replaces the initial weights.
    """
    from transformer_lens.model_bridge import TransformerBridge

    cfg = bridge_config(fields, dtype)
    if (cfg.positional_embedding_type or "standard") not in ("standard", "rotary"):
        raise ModelError(
            f"positional_embedding_type={cfg.positional_embedding_type!r} has no TransformerLens native model "
            "(standard and rotary have); use TransformerLens 3.x for it"
        )
    torch.random.default_generator.manual_seed(seed)
    sd = hooked_init_state_dict(cfg, dtype, fields.get("initializer_range")) if state_dict is None else state_dict
    cfg.init_weights = False
    with contextlib.redirect_stdout(io.StringIO()):  # "Moving model to device"
        model = TransformerBridge.boot_native(cfg, tokenizer=tokenizer, dtype=dtype)
        load_bridge_state_dict(model, sd, "the initial weights")
        return model.to(device).eval()


def _is_hooked_format(sd: dict[str, Any]) -> bool:
    return any(k.endswith((".W_E", ".W_Q", "._W_K", ".W_U")) for k in sd)


def _rotary_order(cfg: Any) -> torch.Tensor | None:
    """Per head, the HookedTransformer q/k dimension each native dimension takes (None: no rotary).

    A HookedTransformer rotates the pairs (i, i + r/2) of the first r = rotary_dim dimensions (GPT-NeoX
    style); the native model rotates adjacent pairs (2i, 2i + 1). Permuting W_Q and W_K (and their
    biases) the same way maps one onto the other and leaves q·k unchanged.
    """
    if (getattr(cfg, "positional_embedding_type", None) or "standard") != "rotary" or getattr(cfg, "rotary_adjacent_pairs", False):
        return None
    r = getattr(cfg, "rotary_dim", None) or cfg.d_head
    half = torch.arange(r // 2)
    return torch.cat([torch.stack([half, half + r // 2], dim=1).flatten(), torch.arange(r, cfg.d_head)])


def _permute_qk(sd: dict[str, torch.Tensor], cfg: Any, order: torch.Tensor) -> dict[str, torch.Tensor]:
    out = dict(sd)
    for key, t in sd.items():
        if key.endswith((".q.weight", ".k.weight", ".q.bias", ".k.bias")):
            heads = t.shape[0] // cfg.d_head
            out[key] = t.reshape(heads, cfg.d_head, *t.shape[1:])[:, order].reshape(t.shape).contiguous()
    return out


def to_bridge_state_dict(sd: dict[str, torch.Tensor], cfg: Any) -> dict[str, torch.Tensor]:
    """A HookedTransformer state dict in the native bridge's format (rotary and mask buffers dropped)."""
    from transformer_lens.utilities.tl_checkpoint_conversion import convert_tl_checkpoint

    keep = {k: v for k, v in sd.items() if not k.endswith((".rotary_sin", ".rotary_cos"))}
    out = convert_tl_checkpoint(keep, cfg)
    order = _rotary_order(cfg)
    return out if order is None else _permute_qk(out, cfg, order)


_BACK = [  # bridge suffix -> HookedTransformer suffix (its reshaping is in to_hooked_state_dict)
    (".q.weight", ".W_Q"), (".k.weight", ".W_K"), (".v.weight", ".W_V"), (".o.weight", ".W_O"),
    (".q.bias", ".b_Q"), (".k.bias", ".b_K"), (".v.bias", ".b_V"), (".o.bias", ".b_O"),
    (".in.weight", ".W_in"), (".in.bias", ".b_in"), (".out.weight", ".W_out"), (".out.bias", ".b_out"),
    (".gate.weight", ".W_gate"), (".gate.bias", ".b_gate"),
]


def to_hooked_state_dict(sd: dict[str, torch.Tensor], cfg: Any) -> dict[str, torch.Tensor]:
    """A native bridge's state dict in the HookedTransformer format (what checkpoints store).

    ``cfg`` needs ``n_heads``, ``d_head`` and ``n_key_value_heads`` (any config object).
    """
    H, d = cfg.n_heads, cfg.d_head
    kv = getattr(cfg, "n_key_value_heads", None) or H
    gqa = kv != H
    order = _rotary_order(cfg)
    if order is not None:
        sd = _permute_qk(sd, cfg, torch.argsort(order))
    out: dict[str, torch.Tensor] = {}
    for key, t in sd.items():
        new = None
        if key in ("embed.weight", "pos_embed.weight", "unembed.bias"):
            new = ({"embed.weight": "embed.W_E", "pos_embed.weight": "pos_embed.W_pos", "unembed.bias": "unembed.b_U"}[key], t)
        elif key == "unembed.weight":
            new = ("unembed.W_U", t.T.contiguous())
        else:
            for suffix, old in _BACK:
                if key.endswith(suffix):
                    base = key[: -len(suffix)]
                    heads = kv if old[-1] in "KV" else H
                    if old in (".W_Q", ".W_K", ".W_V"):
                        t = t.reshape(heads, d, -1).transpose(1, 2).contiguous()
                    elif old == ".W_O":
                        t = t.reshape(-1, heads, d).permute(1, 2, 0).contiguous()
                    elif old in (".b_Q", ".b_K", ".b_V"):
                        t = t.reshape(heads, d)
                    elif old in (".W_in", ".W_out", ".W_gate"):
                        t = t.T.contiguous()
                    if gqa and old[-1] in "KV":
                        old = "._" + old[1:]
                    new = (base + old, t)
                    break
            if new is None and key.endswith((".weight", ".bias")) and (".ln" in key or key.startswith("ln_final")):
                new = (key.rsplit(".", 1)[0] + (".w" if key.endswith(".weight") else ".b"), t)
        if new is None:
            raise CheckpointError(f"cannot convert bridge state dict key {key!r} to the HookedTransformer format")
        out[new[0]] = new[1]
    return out


def load_bridge_state_dict(model: nn.Module, sd: Any, where: str) -> None:
    """Load ``sd`` (HookedTransformer or bridge format) into a native bridge, in the model's dtypes.

    Raises:
        CheckpointError: a parameter is missing or has the wrong shape.
    """
    if not isinstance(sd, dict):
        raise CheckpointError(f"{where} is not a state dict")
    if _is_hooked_format(sd):
        try:
            sd = to_bridge_state_dict(sd, model.cfg)
        except ValueError as exc:
            raise CheckpointError(f"{where} does not fit the model: {exc}") from None
    ref = model.state_dict()
    missing = sorted(set(ref) - set(sd))
    wrong = sorted(k for k in set(ref) & set(sd) if tuple(sd[k].shape) != tuple(ref[k].shape))
    if missing or wrong:
        raise CheckpointError(
            f"{where} does not fit the model: missing {missing[:5]}, "
            f"wrong shapes {[(k, tuple(sd[k].shape), tuple(ref[k].shape)) for k in wrong[:5]]}"
        )
    model.load_state_dict({k: sd[k].to(ref[k].dtype) for k in ref}, strict=True)


def load_hf_bridge(path: str | os.PathLike, *, device: str = "cpu", dtype: torch.dtype = torch.float32,
                   tokenizer: Any = None):
    """A ``TransformerBridge`` over the HuggingFace causal LM saved in ``path`` (no network; eager attention).

    ``tokenizer`` None: the directory has none (what a training run leaves); the bridge is then
    built around the module without one (``boot_transformers`` would try to load it and fail).
    """
    from transformer_lens.model_bridge import TransformerBridge
    from transformers import AutoConfig, AutoModelForCausalLM

    p = Path(path)
    if not (p / "config.json").is_file():
        raise ModelError(f"{str(p)!r} holds no config.json; expected a directory written by save_pretrained")
    try:
        hf_cfg = AutoConfig.from_pretrained(str(p), local_files_only=True)
    except (OSError, ValueError, KeyError) as exc:
        raise ModelError(f"cannot read the config in {str(p)!r}: {first_line(exc)}") from None
    arch = (hf_cfg.architectures or [None])[0]
    if arch is None:
        raise ModelError(f"{str(p)!r} holds an architecture TransformerLens cannot convert: its config.json names none")
    try:
        hf = AutoModelForCausalLM.from_pretrained(str(p), dtype=dtype, local_files_only=True,
                                                  attn_implementation="eager")
    except Exception as exc:  # noqa: BLE001 - missing, corrupt or foreign weight files raise many types
        raise ModelError(f"could not load the weights in {str(p)!r}: {type(exc).__name__}: {first_line(exc)}") from None
    try:
        if tokenizer is not None:
            model = TransformerBridge.boot_transformers(str(p), hf_model=hf, dtype=dtype, device=device,
                                                        tokenizer=tokenizer)
        else:
            model = _bridge_around(hf, arch, dtype, device, str(p))
    except ModelError:
        raise
    except Exception as exc:  # noqa: BLE001 - an architecture without an adapter raises several types
        raise ModelError(f"{str(p)!r} holds an architecture TransformerLens cannot convert ({arch}): {first_line(exc)}") from None
    if getattr(model.cfg, "original_architecture", None) is None:
        model.cfg.original_architecture = arch
    return model.eval()


def fresh_hf_bridge(hf: nn.Module, *, seed: int, dtype: torch.dtype, tokenizer: Any = None):
    """A bridge over a newly initialised HuggingFace model of ``hf``'s class and config (seeded
    inside ``keep_global_rng``; on the CPU)."""
    from .loading import keep_global_rng

    arch = (hf.config.architectures or [type(hf).__name__])[0]
    with keep_global_rng(), contextlib.redirect_stdout(io.StringIO()):
        torch.random.default_generator.manual_seed(seed)
        fresh = type(hf)._from_config(hf.config, attn_implementation="eager", dtype=dtype).eval()
        return _bridge_around(fresh, arch, dtype, "cpu", "a fresh model", tokenizer).eval()


def _bridge_around(hf: nn.Module, arch: str, dtype: torch.dtype, device: str, where: str, tokenizer: Any = None):
    """A bridge around an HF module in hand, with ``tokenizer`` or none (nothing read from disk or the hub)."""
    try:
        from transformer_lens.model_bridge.sources import build_bridge_from_module
    except ImportError:  # TransformerLens 3.x's bridge: boot_transformers needs a tokenizer
        raise ModelError(
            f"{where!r} has no tokenizer files and this TransformerLens version's bridge needs one; "
            "give one with --tokenizer DIR (load_model(..., tokenizer=DIR))"
        ) from None
    return build_bridge_from_module(hf.to(device), arch, hf_config=hf.config, tokenizer=tokenizer, dtype=dtype,
                                    device=device, model_name=where)


def load_named_bridge(name: str, *, device: str = "cpu", dtype: torch.dtype = torch.float32):
    """``TransformerBridge.boot_transformers(name)``: a model from the hub by name (needs network)."""
    from transformer_lens.model_bridge import TransformerBridge

    try:
        return TransformerBridge.boot_transformers(name, dtype=dtype, device=device).eval()
    except Exception as exc:  # the hub raises many types (network, unknown name)
        raise ModelError(
            f"could not load pretrained model {name!r} ({type(exc).__name__}: {first_line(exc)}); "
            "accepted: 'toy', a local HuggingFace directory, or a model name (needs network)"
        ) from None
