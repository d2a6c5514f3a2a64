"""Fixtures shared by the tests (builders and feature flags live in tests/helpers.py)."""

import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

from helpers import HAS_BRIDGE, HAS_HOOKED, HAS_NATIVE_BRIDGE  # noqa: E402
from hf_fixtures import save_tiny_gpt2, save_tiny_llama  # noqa: E402
from hf_more_fixtures import FOLDERS, save_tiny  # noqa: E402


def pytest_report_header(config):
    """The first lines of every run say which TransformerLens (and what it can do) the suite ran on."""
    def v(name: str) -> str:
        try:
            return version(name)
        except PackageNotFoundError:
            return "not installed"

    can = [name for name, ok in (("HookedTransformer", HAS_HOOKED), ("TransformerBridge", HAS_BRIDGE),
                                 ("boot_native + convert_tl_checkpoint", HAS_NATIVE_BRIDGE)) if ok]
    return [
        f"TransformerLens {v('transformer-lens')} (torch {torch.__version__}, transformers {v('transformers')})",
        f"TransformerLens features: {', '.join(can) or 'none'}",
    ]


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


@pytest.fixture(scope="session")
def hf_more_dirs(tmp_path_factory):
    """{architecture: directory} of tiny GPT-NeoX, Qwen2, Mistral and Gemma models (realistic names)."""
    root = tmp_path_factory.mktemp("hf-more")
    return {arch: save_tiny(arch, root / folder) for arch, folder in FOLDERS.items()}
