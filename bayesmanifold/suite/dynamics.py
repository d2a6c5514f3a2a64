"""The frame/precision dynamics of a checkpoint, from its training record.

A training run that carried a :class:`~bayesmanifold.analyses.DynamicsMonitor` stored its series in
``history["callbacks"]``; otherwise the checkpoint's weight snapshots are replayed through a
monitor (one pass per snapshot), with the calibration against the exact posterior as precision.
"""

from typing import Any

import torch

from ..backends import ModelLike
from ..errors import InputError
from .config import SuiteConfig, Target

__all__ = ["training_dynamics", "replay_range"]

PROBE_SEQS = 32  # probe sequences the monitor reads at every snapshot
CALIBRATION_SEQS = 256  # sequences of the calibration at every snapshot
MIN_RECORDED_STEPS = 4


def _from_history(history: dict) -> tuple[Any, str | None]:
    from ..analyses import DynamicsResult

    for name, state in (history.get("callbacks") or {}).items():
        if isinstance(state, dict) and "attention_drift" in state and state.get("steps"):
            if len(state["steps"]) >= MIN_RECORDED_STEPS:
                return DynamicsResult.from_state(state), f"history.callbacks.{name}"
    return None, None


def replay_range(cfg: dict, how: str) -> tuple[int | None, str]:
    """(last step to replay, description) for a checkpoint's recorded training lineage."""
    if how not in ("first-stage", "all"):
        raise InputError(f"dynamics range must be 'first-stage' or 'all'; got {how!r}")
    lineage = cfg.get("lineage") or []
    if how == "all" or not lineage:
        return None, ""
    first = lineage[0]
    end = int(first.get("step_offset", 0)) + int(first["steps"])
    return end, f" (the from-scratch stage, 1 of {len(lineage) + 1}; 'all' replays every stage)"


def training_dynamics(target: Target, config: SuiteConfig, positions: torch.Tensor) -> tuple[Any, str | None]:
    """(DynamicsResult or None, where it came from) for a wind-tunnel target."""
    d, source = _from_history(target.history if isinstance(target.history, dict) else {})
    ckpt = target.checkpoint_dir
    if d is not None or ckpt is None or not (ckpt / "snapshots").is_dir() or not any((ckpt / "snapshots").glob("step_*.pt")):
        return d, source
    from ..analyses import DynamicsMonitor, replay
    from ..models.checkpoint import read_config
    from ..windtunnels.calibration import measure_calibration

    task, seed = target.task, config.seed
    probe = task.sample(PROBE_SEQS, generator=seed + 1).tokens
    pm = torch.zeros(probe.shape, dtype=torch.bool)
    pm[:, task.positions if hasattr(task, "positions") else positions] = True

    def calibration(model: ModelLike) -> float:
        return float(measure_calibration(model, task, n_seqs=CALIBRATION_SEQS, generator=seed + 2).entropy_mae_bits)

    monitor = DynamicsMonitor(probe, every=1, query_positions=pm, key_token_ids=task.answer_tokens.tolist(), calibration_fn=calibration)
    max_step, which = replay_range(read_config(ckpt), config.dynamics_range)
    d = replay(ckpt, target.model, monitor, max_snapshots=config.max_snapshots, max_step=max_step)
    return d, f"replay of {len(d.steps)} snapshots, steps {d.steps[0]}–{d.steps[-1]}{which}"
