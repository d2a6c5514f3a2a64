"""The HookedTransformer backend (TransformerLens 2.18 and 3.x, and any ``HookedRootModule`` named
like TransformerLens).

Facts come from ``model.cfg`` and each attention module (``attn_scale`` is the divisor of q·k);
hook points are TransformerLens's names (``blocks.L.attn.hook_pattern``; rotary q and k at
``hook_rot_q``/``hook_rot_k``); masked scores are −inf. Loading a HuggingFace directory converts
its own config.json with TransformerLens's converter (from a neutral path, so that the
directory's name cannot select a built-in config) and loads the weights without folding layer
norms or centring, so internals match HuggingFace (logits agree to ~1e-6 in float32).
"""

import contextlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from ..errors import CheckpointError, ModelError
from . import bridge_loading
from .base import _TL_NAME, CORE_SITES, AttentionLayerInfo, Backend
from .loading import first_line

__all__ = ["HookedBackend", "hooked_transformer_classes", "tl_hook_classes"]

_LAYER_RE = re.compile(r"^blocks\.(\d+)\.attn\.(hook_attn_scores|hook_pattern|hook_v|hook_z)$")
# HookedTransformer attention parameter names of each kind (``_W_K`` etc. under GQA).
_KIND_NAMES = {
    "qk": ("W_Q", "W_K", "b_Q", "b_K", "_W_K", "_b_K"),
    "values": ("W_V", "b_V", "_W_V", "_b_V"),
}
# Substrings of a model name that make TransformerLens's converter take a name-based branch
# (built-in configs of official checkpoints) instead of reading the directory's config.json.
_NAME_TRIGGERS = ("llama", "gemma", "wav2vec2", "santacoder")


def _hooked_root() -> type | None:
    try:
        from transformer_lens.hook_points import HookedRootModule
    except ImportError:  # pragma: no cover - TransformerLens 4 exports it from the top level only
        try:
            from transformer_lens import HookedRootModule
        except ImportError:
            return None
    return HookedRootModule


def tl_hook_classes() -> tuple[type, type]:
    """``(HookPoint, HookedRootModule)`` of the installed TransformerLens, for models written on its
    hook points (the experiments' hand-built models)."""
    from transformer_lens.hook_points import HookPoint

    return HookPoint, _hooked_root()


def hooked_transformer_classes() -> tuple[type, type]:
    """``(HookedTransformer, HookedTransformerConfig)``; ModelError on TransformerLens 4, which has none."""
    try:
        from transformer_lens import HookedTransformer, HookedTransformerConfig
    except ImportError:
        raise ModelError("this model needs TransformerLens's HookedTransformer (2.18 or 3.x); "
                         "TransformerLens 4 removed it") from None
    return HookedTransformer, HookedTransformerConfig


class HookedBackend(Backend):
    """A TransformerLens ``HookedRootModule`` (``HookedTransformer`` or one named like it).

    Raises:
        ModelError: the model is not a ``HookedRootModule`` or has no attention layer with the
            four hook points capture needs.
    """

    name: ClassVar[str] = "HookedTransformer"

    def __init__(self, model: nn.Module) -> None:
        if not self.handles(model):
            raise ModelError(
                f"expected a TransformerLens model (HookedTransformer or another HookedRootModule), "
                f"got {type(model).__name__}; load HuggingFace models with bayesmanifold.load_model"
            )
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

    # ------------------------------------------------------------------ which models; building and loading
    @classmethod
    def handles(cls, model: object) -> bool:
        root = _hooked_root()
        return root is not None and isinstance(model, root) and hasattr(model, "hook_dict")

    @classmethod
    def available(cls) -> bool:
        return bridge_loading.hooked_available()

    @classmethod
    def build(cls, fields: dict[str, Any], *, seed: int, device: str | torch.device, dtype: torch.dtype,
              tokenizer: Any = None) -> nn.Module:
        from transformer_lens import HookedTransformer, HookedTransformerConfig

        torch.random.default_generator.manual_seed(seed)
        model = HookedTransformer(HookedTransformerConfig(**{**fields, "dtype": dtype}), tokenizer=tokenizer)
        return model if torch.device(device).type == "cpu" else model.to(device)

    @classmethod
    def load_hf(cls, path: Path, *, dtype: torch.dtype, tokenizer: Any = None) -> nn.Module:
        from transformer_lens import loading_from_pretrained as loading
        from transformers import AutoModelForCausalLM

        cfg_dict = hf_config_dict(path)
        try:
            hf = AutoModelForCausalLM.from_pretrained(str(path), torch_dtype=dtype, local_files_only=True)
        except Exception as exc:  # noqa: BLE001 - missing, corrupt or foreign weight files raise many types
            raise ModelError(f"could not load the weights in {str(path)!r}: {type(exc).__name__}: {first_line(exc)}") from None
        if tokenizer is None:  # stop TransformerLens from loading one by name (2.x does)
            cfg_dict = {**cfg_dict, "tokenizer_name": None}
        fields = {**cfg_dict, "seed": None, "device": "cpu"}
        model = cls.build(fields, seed=0, device="cpu", dtype=dtype, tokenizer=tokenizer)
        try:
            state = loading.get_pretrained_state_dict(str(path), model.cfg, hf_model=hf, dtype=dtype)
            model.load_and_process_state_dict(
                state, fold_ln=False, center_writing_weights=False, center_unembed=False, fold_value_biases=False
            )
        except (RuntimeError, KeyError, ValueError, TypeError, AttributeError) as exc:  # weights that do not fit
            raise ModelError(f"the weights in {str(path)!r} do not fit its config: {type(exc).__name__}: {first_line(exc)}") from None
        return model

    @classmethod
    def load_named(cls, name: str, *, device: str, dtype: torch.dtype) -> nn.Module:
        from transformer_lens import HookedTransformer

        return HookedTransformer.from_pretrained_no_processing(name, device=device, dtype=dtype)

    def load_state_dict(self, sd: Any, where: str) -> None:
        if not isinstance(sd, dict):
            raise CheckpointError(f"{where} is not a state dict")
        model = self.model
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
        # Buffers (causal masks, IGNORE) are derived from the config and differ between
        # TransformerLens versions (3.x stores an empty mask): keep the model's unless shapes agree.
        keep = {k: v.to(ref[k].dtype) for k, v in sd.items()
                if k in params or (k in ref and torch.is_tensor(v) and tuple(v.shape) == tuple(ref[k].shape))}
        model.load_state_dict(keep, strict=False)

    def config_fields(self) -> dict[str, Any]:
        d = self.cfg.to_dict()
        d.update(seed=None, init_weights=True, device="cpu")
        return d

    def parameter_names(self, kind: str, layers: Sequence[int] | None = None) -> list[str]:
        if kind == "all":
            return super().parameter_names(kind, layers)
        out = []
        for name, p in self.model.named_parameters():
            parts = name.split(".")
            if (
                torch.is_floating_point(p)
                and len(parts) == 4
                and parts[0] == "blocks"
                and parts[2] == "attn"
                and parts[3] in _KIND_NAMES[kind]
                and (layers is None or int(parts[1]) in layers)
            ):
                out.append(name)
        return out

    # ------------------------------------------------------------------ weights
    def key_weights(self, layer: int) -> tuple[Tensor, Tensor | None]:
        """``W_K`` and ``b_K`` per kv head (unexpanded under GQA: ``_W_K``; ``b_K`` may be None)."""
        attn = self.model.blocks[layer].attn
        W = getattr(attn, "_W_K", None)
        b = getattr(attn, "_b_K", None)
        if W is None:
            W, b = attn.W_K, getattr(attn, "b_K", None)
        return W.detach(), (None if b is None else b.detach())


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
    theta = getattr(hf_cfg, "rope_theta", None) or (getattr(hf_cfg, "rope_parameters", None) or {}).get("rope_theta")
    if cfg.get("positional_embedding_type") == "rotary" and theta and cfg.get("rotary_base") != theta:
        # TransformerLens 2.18 converts Llama configs without their rope_theta (it keeps 10,000): SmolLM2's
        # 100,000 then gave other logits than HuggingFace's (next-token entropies off by up to 0.5 nats)
        cfg["rotary_base"] = int(theta) if float(theta).is_integer() else float(theta)
    return {**cfg, "tokenizer_name": str(p)}
