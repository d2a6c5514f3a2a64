"""Shared test builders: tiny TransformerLens models from configs, offline HF fixtures, seeds."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

from hf_fixtures import save_tiny_gpt2, save_tiny_llama  # noqa: E402


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
        seed=seed,
        dtype=dtype,
        device="cpu",
    )
    cfg.update(overrides)
    if cfg.get("attn_only"):
        cfg["d_mlp"] = None
    return HookedTransformer(HookedTransformerConfig(**cfg)).eval()


@pytest.fixture
def gen():
    """A seeded generator: tests draw their randomness from it, never from global state."""
    return torch.Generator().manual_seed(1234)


@pytest.fixture(scope="session")
def hf_gpt2_dir(tmp_path_factory):
    return save_tiny_gpt2(tmp_path_factory.mktemp("hf") / "tiny-gpt")


@pytest.fixture(scope="session")
def hf_llama_dir(tmp_path_factory):
    # Neutral folder name: a path containing "llama" switches TL to built-in configs.
    return save_tiny_llama(tmp_path_factory.mktemp("hf") / "tiny-gqa")


def hook_count(model) -> int:
    """Every forward/backward hook on every hook point (TL-visible and raw PyTorch ones)."""
    n = 0
    for hp in model.hook_dict.values():
        n += len(hp._forward_hooks) + len(hp._backward_hooks) + len(hp._forward_pre_hooks)
        n += len(getattr(hp, "_backward_pre_hooks", {}))
    return n
