"""Builders shared by the tests: tiny TransformerLens models from configs, hook counting, and what
the installed TransformerLens can do (for skips by feature).

Models are built with a local seed inside ``torch.random.fork_rng``: TransformerLens's ``seed=``
config field would reseed the global torch, numpy and Python RNGs. On TransformerLens 4 (no
HookedTransformer) :func:`make_model` boots the native bridge with the same config and the same
initial weights (the HookedTransformer's initialisation replayed draw for draw).
"""

from importlib.metadata import version

import pytest
import torch


def _has_hooked() -> bool:
    try:
        from transformer_lens import HookedTransformer  # noqa: F401
    except ImportError:
        return False
    return True


def _has_bridge() -> bool:
    try:
        from transformer_lens.model_bridge import TransformerBridge

        return hasattr(TransformerBridge, "boot_transformers")
    except ImportError:
        return False


def _has_native_bridge() -> bool:
    try:
        from transformer_lens.model_bridge import TransformerBridge
        from transformer_lens.utilities.tl_checkpoint_conversion import convert_tl_checkpoint  # noqa: F401

        return hasattr(TransformerBridge, "boot_native")
    except ImportError:
        return False


TL_VERSION = version("transformer-lens")
#: TransformerLens 2.18 and 3.x: HookedTransformer exists (4.0 removed it).
HAS_HOOKED = _has_hooked()
#: TransformerBridge over HuggingFace models (3.x and 4.x).
HAS_BRIDGE = _has_bridge()
#: boot_native and convert_tl_checkpoint (4.x): our models and checkpoints as bridges.
HAS_NATIVE_BRIDGE = _has_native_bridge()

needs_hooked = pytest.mark.skipif(
    not HAS_HOOKED, reason=f"needs HookedTransformer, which TransformerLens {TL_VERSION} does not have (4.0 removed it)"
)
needs_bridge = pytest.mark.skipif(
    not HAS_BRIDGE, reason=f"needs TransformerBridge, which TransformerLens {TL_VERSION} does not have (3.x and 4.x do)"
)
#: Tests whose oracle is run_with_cache's ``hook_attn_scores`` (and its gradient): a boot_native bridge
#: fires it after the softmax and gives it no gradient. The bridge backend reads the softmax's input
#: instead; tests/hooks/test_bridge.py checks capture against autograd through the laws.
needs_hooked_scores_cache = pytest.mark.skipif(
    not HAS_HOOKED,
    reason=f"oracle is run_with_cache's hook_attn_scores, which TransformerLens {TL_VERSION}'s boot_native bridge "
    "fires after the softmax with no gradient (the bridge backend reads the softmax input; see test_bridge.py)",
)
needs_native_bridge = pytest.mark.skipif(
    not HAS_NATIVE_BRIDGE,
    reason=f"needs TransformerBridge.boot_native and convert_tl_checkpoint, which TransformerLens {TL_VERSION} lacks (4.x has them)",
)


def make_model(dtype=torch.float64, seed=0, **overrides):
    """A tiny model (2 layers, 4 heads, d_model 32) with config overrides.

    A HookedTransformer where TransformerLens has one; on TransformerLens 4 the native
    TransformerBridge with the same config and the same initial weights.
    """
    cfg = dict(
        n_layers=2,
        d_model=32,
        n_heads=4,
        d_head=8,
        d_mlp=64,
        d_vocab=50,
        n_ctx=32,
        act_fn="gelu",
        normalization_type="LN",
        dtype=dtype,
        device="cpu",
    )
    cfg.update(overrides)
    if cfg.get("attn_only"):
        cfg["d_mlp"] = None
    if not HAS_HOOKED:
        from bayesmanifold.backends.bridge_loading import build_native
        from bayesmanifold.errors import ModelError

        with torch.random.fork_rng(devices=[]):
            try:
                return build_native(cfg, seed=seed, dtype=cfg["dtype"])
            except ModelError as exc:  # as HookedTransformerConfig does for a field it lacks
                raise TypeError(str(exc)) from None
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return HookedTransformer(HookedTransformerConfig(**cfg)).eval()


def hook_count(model) -> int:
    """Every forward/backward hook on every hook point and attention module (where a bridge's score tap
    goes), plus any torch function mode left active. A TransformerBridge's own wiring of its wrapped
    norm modules (added on its first forward) is not counted."""
    mods = {id(hp): hp for hp in model.hook_dict.values()}
    for block in getattr(model, "blocks", []):
        attn = getattr(block, "attn", None)
        if isinstance(attn, torch.nn.Module):
            mods[id(attn)] = attn
    n = 0
    for m in mods.values():
        n += len(m._forward_hooks) + len(m._backward_hooks) + len(m._forward_pre_hooks)
        n += len(getattr(m, "_backward_pre_hooks", {}))
    return n + torch._C._len_torch_function_stack()


def run_over_several_tiles(gen, accumulator, padded: bool) -> dict:
    """Capture ``accumulator`` on 3 sequences of 33 positions of a float64 model, left-padded (rows 0
    and 2) if ``padded``; return the kept bundles. 33 positions make three query blocks of the
    statistics' tiles, each reaching only its last visible key."""
    from bayesmanifold.hooks import capture

    model = make_model(dtype=torch.float64, n_ctx=40)
    tokens = torch.randint(0, 50, (3, 33), generator=gen)
    mask = torch.ones(3, 33, dtype=torch.long)
    if padded:
        mask[0, :5] = 0
        mask[2, :11] = 0
    with capture(model, accumulators=[accumulator], keep=True) as cap:
        cap.run(tokens, attention_mask=mask)
        return cap.kept


def make_sink_model(dtype=torch.float64, gap: float = 25.0, seed: int = 0):
    """A tiny attention-only model whose head 0.0 is an attention sink: every query puts all but
    ~e^-gap of its attention on position 0 (as SmolLM2's head 18.8 does). There the routing law's
    value α(b − b̄) is many orders of magnitude below its terms α b and α b̄, so their rounding
    dominates it: the case a tolerance relative to |∂L/∂s| judges wrongly.

    Built by editing the HookedTransformer-format weights: position 0 writes 1 into residual
    dimension 0, head 0's key reads it into its key dimension 0 and its query bias is
    gap·√d_head there, so the score of key 0 exceeds the others' by about ``gap``.
    """
    cfg = dict(n_layers=2, d_model=32, n_heads=4, d_head=8, d_mlp=None, attn_only=True, d_vocab=50, n_ctx=32,
               act_fn="gelu", normalization_type=None, dtype=dtype, device="cpu")

    def edit(sd):
        sd = {k: v.clone() for k, v in sd.items()}
        sd["pos_embed.W_pos"][:, 0] = 0.0
        sd["pos_embed.W_pos"][0, 0] = 1.0
        sd["blocks.0.attn.W_K"][0, 0, :] = 0.0
        sd["blocks.0.attn.W_K"][0, :, 0] = 0.0
        sd["blocks.0.attn.W_K"][0, 0, 0] = 1.0
        sd["blocks.0.attn.b_Q"][0, :] = 0.0
        sd["blocks.0.attn.b_Q"][0, 0] = gap * cfg["d_head"] ** 0.5
        return sd

    if not HAS_HOOKED:
        from bayesmanifold.backends.bridge_loading import (
            bridge_config,
            build_native,
            hooked_init_state_dict,
        )

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            sd = hooked_init_state_dict(bridge_config(cfg, dtype), dtype)
            return build_native(cfg, seed=seed, dtype=dtype, state_dict=edit(sd))
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = HookedTransformer(HookedTransformerConfig(**cfg)).eval()
    model.load_state_dict(edit(model.state_dict()))
    return model
