"""Attaching to TransformerLens models: hook points, capture, objectives, loading."""

from .capture import Accumulator, Capture, LayerBundle, capture
from .loading import load_hf_directory, load_model, toy_model
from .objectives import logit_difference, loss_at_positions, next_token_loss

__all__ = [
    "Accumulator",
    "Capture",
    "LayerBundle",
    "capture",
    "load_hf_directory",
    "load_model",
    "toy_model",
    "logit_difference",
    "loss_at_positions",
    "next_token_loss",
]
