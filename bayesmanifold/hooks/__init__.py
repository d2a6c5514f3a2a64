"""The engine: capture (the one path through a model), the per-layer bundles, objectives and
interventions. It asks the model's backend (:mod:`bayesmanifold.backends`) for every hook point
and never reads the model itself."""

from ..backends import (
    AttentionLayerInfo,
    Backend,
    Batch,
    model_access,
    position_mask,
    select_heads,
    select_layers,
)
from .bundle import Accumulator, LayerBundle, OutputBundle
from .capture import Capture, capture
from .objectives import logit_difference, loss_at_positions, next_token_loss

__all__ = [
    "Accumulator",
    "AttentionLayerInfo",
    "Backend",
    "Batch",
    "Capture",
    "LayerBundle",
    "OutputBundle",
    "capture",
    "logit_difference",
    "loss_at_positions",
    "model_access",
    "next_token_loss",
    "position_mask",
    "select_heads",
    "select_layers",
]
