"""Model presets for the wind tunnels: the paper's sizes and smaller ones that train on a CPU.

Paper I (arXiv 2512.22471, appendix; the authors' code) trains, for bijection elimination, a
6-layer, 6-head transformer of width 192 (head 32) with learned absolute positions, pre-norm
RMSNorm, a GELU MLP of width 4·d and tied input/output embeddings (2.69M parameters), and for HMM
filtering a 9-layer, 8-head transformer of width 256. Here a transformer is a TransformerLens
``HookedTransformer`` (``normalization_type="RMSPre"``, ``act_fn="gelu"``,
``positional_embedding_type="standard"``) so that every hook of the package attaches to it.
**Tied embeddings are not native in TransformerLens** (``W_E`` and ``W_U`` are separate
parameters), so our models are untied; the paper's 2.69M becomes ~2.7M + d·vocab.

A :class:`ModelSpec` holds everything needed to rebuild a model (it is stored in checkpoints);
:func:`preset_spec` turns a preset name plus a task into one, and :func:`build_model` builds it
with a seeded initialisation that leaves the global random state untouched (TransformerLens
models are built by :func:`bayesmanifold.backends.build_model`: the backends are the only code
that imports TransformerLens).
"""

import contextlib
import io
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
from torch import nn

from ..backends import build_model as build_backend_model
from ..backends import keep_global_rng
from ..errors import ConfigError
from ..windtunnels.base import WindTunnel

__all__ = ["ModelSpec", "PRESETS", "ARCHS", "preset_spec", "build_model", "count_params",
           "hooked_config", "move_model"]

ARCHS = ("transformer", "lstm", "mlp")

#: preset name -> (n_layers, n_heads, d_model). d_mlp = 4·d_model (transformer).
PRESETS: dict[str, dict[str, Any]] = {
    "bijection-paper": {"n_layers": 6, "n_heads": 6, "d_model": 192},
    "hmm-paper": {"n_layers": 9, "n_heads": 8, "d_model": 256},
    "bijection-cpu": {"n_layers": 2, "n_heads": 4, "d_model": 64},
    "hmm-cpu": {"n_layers": 3, "n_heads": 4, "d_model": 64},
    "hmm-cpu-wide": {"n_layers": 3, "n_heads": 4, "d_model": 128},
    "hmm-cpu-deep": {"n_layers": 6, "n_heads": 4, "d_model": 64},
    # the size trend of the value-manifold and focusing protocols (analyses/RESULTS.md)
    "bijection-cpu-3x96": {"n_layers": 3, "n_heads": 4, "d_model": 96},
    "bijection-cpu-4x128": {"n_layers": 4, "n_heads": 4, "d_model": 128},
    "small": {"n_layers": 2, "n_heads": 2, "d_model": 32},
    "tiny": {"n_layers": 1, "n_heads": 2, "d_model": 16},
    # byte-level models of Python's stdlib (task "text"); attn_only: no MLP blocks. The shipped
    # stdlib-attn2 and stdlib-mlp2 use these; the other variants were tried for induction heads
    "stdlib-attn2": {"n_layers": 2, "n_heads": 4, "d_model": 64, "attn_only": 1},
    "stdlib-attn2-rope": {"n_layers": 2, "n_heads": 4, "d_model": 64, "attn_only": 1, "positional": "rotary"},
    # positions added to queries and keys only (TransformerLens "shortformer", as in its attn-only-2l)
    "stdlib-attn2-short": {"n_layers": 2, "n_heads": 4, "d_model": 64, "attn_only": 1, "positional": "shortformer"},
    "stdlib-attn2-d128": {"n_layers": 2, "n_heads": 4, "d_model": 128, "attn_only": 1},
    "stdlib-mlp2": {"n_layers": 2, "n_heads": 4, "d_model": 64},
}

#: the preset each task uses when none is given.
DEFAULT_PRESET = {"bijection": "bijection-cpu", "hmm": "hmm-cpu", "recall": "small", "text": "stdlib-attn2"}


@dataclass(frozen=True, kw_only=True)
class ModelSpec:
    """Everything needed to rebuild a model of one of the three architectures.

    Attributes:
        arch: ``"transformer"`` (TransformerLens), ``"lstm"`` or ``"mlp"`` (attention-free).
        n_layers, d_model: depth and width (LSTM: layers and hidden size).
        n_heads: attention heads (transformer only; ``d_head = d_model // n_heads``).
        d_mlp: MLP hidden width (transformer and MLP baseline).
        d_vocab: vocabulary size; n_ctx: maximum sequence length (learned positions).
        mlp_context: what each position of the MLP baseline sees of its prefix, see
            :class:`bayesmanifold.models.baselines.CausalMLP`.
    """

    arch: str
    n_layers: int
    d_model: int
    n_heads: int = 1
    d_mlp: int = 0
    d_vocab: int
    n_ctx: int
    mlp_context: str = "mean"
    attn_only: bool = False  # transformer without MLP blocks (recorded only when True)
    positional: str = "standard"  # "standard" (learned, added to the residual), "rotary" or "shortformer"

    def __post_init__(self) -> None:
        if self.arch not in ARCHS:
            raise ConfigError(f"arch must be one of {ARCHS}; got {self.arch!r}")
        for name in ("n_layers", "d_model", "n_heads", "d_vocab", "n_ctx"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"{name} must be a positive int; got {v!r}")
        if self.arch == "transformer" and self.d_model % self.n_heads:
            raise ConfigError(f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}")
        if self.positional not in ("standard", "rotary", "shortformer"):
            raise ConfigError(f"positional must be 'standard', 'rotary' or 'shortformer'; got {self.positional!r}")
        if self.mlp_context not in ("mean", "none"):
            raise ConfigError(f"mlp_context must be 'mean' or 'none'; got {self.mlp_context!r}")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        if not d["attn_only"]:
            del d["attn_only"]  # configs without these options stay as they were
        if d["positional"] == "standard":
            del d["positional"]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelSpec":
        names = {f.name for f in fields(cls)}
        if "rotary" in d and "positional" not in d:  # configs written before `positional` existed
            d = {k: v for k, v in d.items() if k != "rotary"} | ({"positional": "rotary"} if d["rotary"] else {})
        unknown = set(d) - names
        if unknown:
            raise ConfigError(f"unknown ModelSpec fields {sorted(unknown)}; accepted {sorted(names)}")
        return cls(**d)


def preset_spec(
    preset: str, task: WindTunnel, arch: str = "transformer", n_ctx: "int | None" = None
) -> ModelSpec:
    """The :class:`ModelSpec` of ``preset`` for ``task``.

    The LSTM baseline has the preset's depth and width (as in the paper); the MLP baseline has
    its depth and width with an MLP of width 6·d, so that a block has ~12·d² weights like a
    transformer block (4·d² attention + 8·d² MLP). HMM presets get ``n_ctx`` for K = 53
    observations so that the K=30/K=50 length-generalisation tests fit the learned positions.
    """
    if preset not in PRESETS:
        raise ConfigError(f"unknown preset {preset!r}; accepted: {sorted(PRESETS)}")
    p = PRESETS[preset]
    if n_ctx is None:
        n_ctx = task.seq_len
        if task.NAME == "hmm":
            n_ctx = max(n_ctx, task.with_K(53).seq_len)  # type: ignore[attr-defined]
    if n_ctx < task.seq_len:
        raise ConfigError(f"n_ctx={n_ctx} is shorter than the task's sequences ({task.seq_len})")
    d = p["d_model"]
    return ModelSpec(
        arch=arch,
        n_layers=p["n_layers"],
        d_model=d,
        n_heads=p["n_heads"] if arch == "transformer" else 1,
        d_mlp=(4 * d if arch == "transformer" else 6 * d if arch == "mlp" else 0),
        d_vocab=task.d_vocab,
        n_ctx=n_ctx,
        attn_only=bool(p.get("attn_only")) and arch == "transformer",
        positional=str(p.get("positional", "standard")) if arch == "transformer" else "standard",
    )


def hooked_config(spec: ModelSpec) -> dict[str, Any]:
    """The ``HookedTransformerConfig`` fields of a transformer spec (a plain dict)."""
    return dict(
        n_layers=spec.n_layers,
        d_model=spec.d_model,
        n_heads=spec.n_heads,
        d_head=spec.d_model // spec.n_heads,
        d_mlp=None if spec.attn_only else spec.d_mlp,
        attn_only=spec.attn_only,
        d_vocab=spec.d_vocab,
        n_ctx=spec.n_ctx,
        act_fn="gelu",
        normalization_type="RMSPre",
        positional_embedding_type=spec.positional,
        rotary_dim=spec.d_model // spec.n_heads if spec.positional == "rotary" else None,
        default_prepend_bos=False,
    )


def build_model(spec: ModelSpec, seed: int = 0, device: str = "cpu", tokenizer: Any = None) -> nn.Module:
    """Build a freshly initialised model; the init is seeded and the global RNG is left as found.

    The weights are drawn on the CPU (so they do not depend on ``device``) from the seeded
    default generator inside :func:`bayesmanifold.backends.keep_global_rng`. Every
    architecture maps tokens ``[batch, pos]`` to logits ``[batch, pos, d_vocab]``. A transformer
    gets ``tokenizer`` (a HuggingFace tokenizer, e.g. a BPE text checkpoint's) as its own.
    """
    from .baselines import CausalMLP, LSTMModel

    if spec.arch == "transformer":
        return build_backend_model(hooked_config(spec), seed=seed, device=device, tokenizer=tokenizer)
    with keep_global_rng():
        torch.random.default_generator.manual_seed(seed)
        if spec.arch == "lstm":
            model: nn.Module = LSTMModel(spec.d_vocab, spec.d_model, spec.n_layers)
        else:
            model = CausalMLP(spec.d_vocab, spec.d_model, spec.d_mlp, spec.n_layers, spec.n_ctx,
                              context=spec.mlp_context)
    return model.to(device)


def move_model(model: nn.Module, device: "str | torch.device") -> nn.Module:
    """``model.to(device)`` without TransformerLens's "Moving model to device" print."""
    with contextlib.redirect_stdout(io.StringIO()):
        return model.to(device)


def count_params(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
