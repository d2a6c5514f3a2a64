"""The only code that touches models: capture (the one engine), the batch value, selections,
objectives, the model-access layer, loading, and interventions."""

from .access import AttentionLayerInfo, ModelAccess, model_access
from .batch import Batch, position_mask
from .bundle import Accumulator, LayerBundle, OutputBundle
from .capture import Capture, capture
from .loading import load_hf_directory, load_model, toy_model
from .objectives import logit_difference, loss_at_positions, next_token_loss
from .selection import select_heads, select_layers

__all__ = [
    "Accumulator",
    "AttentionLayerInfo",
    "Batch",
    "Capture",
    "LayerBundle",
    "ModelAccess",
    "OutputBundle",
    "capture",
    "load_hf_directory",
    "load_model",
    "logit_difference",
    "loss_at_positions",
    "model_access",
    "next_token_loss",
    "position_mask",
    "select_heads",
    "select_layers",
    "toy_model",
]
