"""Fixtures shared by the tests (builders live in tests/helpers.py)."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

from hf_fixtures import save_tiny_gpt2, save_tiny_llama  # noqa: E402


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
