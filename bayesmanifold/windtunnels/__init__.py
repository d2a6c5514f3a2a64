"""Wind tunnels: sequence tasks with exact posterior predictives (Paper I, arXiv 2512.22471)."""

from .base import TaskBatch, WindTunnel, entropy_bits, make_generator
from .bijection import BijectionTask
from .calibration import (
    CalibrationResult,
    calibration_from_probs,
    measure_calibration,
)
from .hmm import HMMTask
from .recall import RecallTask
from .registry import TASKS, task_from_dict

__all__ = [
    "TaskBatch",
    "WindTunnel",
    "entropy_bits",
    "make_generator",
    "BijectionTask",
    "CalibrationResult",
    "calibration_from_probs",
    "measure_calibration",
    "HMMTask",
    "RecallTask",
    "TASKS",
    "task_from_dict",
]
from .sticky_chain import StickyChainConfig, StickyChainData, sample_sticky_chain, sticky_transition_matrix  # noqa: E402, F401, I001
