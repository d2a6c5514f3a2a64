"""Builders shared by the tests: tiny TransformerLens models from configs, hook counting.

Models are built with a local seed inside ``torch.random.fork_rng``: TransformerLens's ``seed=``
config field would reseed the global torch, numpy and Python RNGs.
"""

import torch


def make_model(dtype=torch.float64, seed=0, **overrides):
    """A tiny HookedTransformer (2 layers, 4 heads, d_model 32) with config overrides."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig

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
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return HookedTransformer(HookedTransformerConfig(**cfg)).eval()


def hook_count(model) -> int:
    """Every forward/backward hook on every hook point (TL-visible and raw PyTorch ones)."""
    n = 0
    for hp in model.hook_dict.values():
        n += len(hp._forward_hooks) + len(hp._backward_hooks) + len(hp._forward_pre_hooks)
        n += len(getattr(hp, "_backward_pre_hooks", {}))
    return n
