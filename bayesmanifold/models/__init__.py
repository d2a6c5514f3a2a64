"""Models for the wind tunnels: presets, attention-free baselines, training and checkpoints."""

from .baselines import CausalMLP, LSTMModel
from .checkpoint import list_shipped, load_checkpoint, save_checkpoint
from .presets import PRESETS, ModelSpec, build_model, count_params, preset_spec
from .snapshots import load_snapshot
from .target import Target, open_model, open_target
from .training import TrainConfig, TrainResult, train

__all__ = [
    "CausalMLP",
    "LSTMModel",
    "ModelSpec",
    "PRESETS",
    "build_model",
    "count_params",
    "preset_spec",
    "TrainConfig",
    "TrainResult",
    "train",
    "load_checkpoint",
    "load_snapshot",
    "save_checkpoint",
    "list_shipped",
    "Target",
    "open_model",
    "open_target",
]
