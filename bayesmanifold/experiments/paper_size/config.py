"""Settings of a paper-size wind-tunnel run: the authors' shapes and schedules, a time budget, snapshots.

The shapes are the presets ``bijection-paper`` (6 layers × 6 heads, d_model 192) and ``hmm-paper``
(9 layers × 8 heads, d_model 256) of :mod:`bayesmanifold.models.presets`. The schedules follow the
authors' ``configs/bijection_v20.yaml`` (batch 128, lr 3e-4, warm-up 2,000, 100,000 steps, hard
targets) and, for HMM, their re-run's ~78,000 steps with soft targets; the HMM batch size and
learning rate are ours (64, 3e-4), not read from their code. Their HMM model has dropout 0.1; our
TransformerLens models have none.

A run on an accelerator for a few minutes cannot do 100,000 steps: ``time_budget_s`` caps the
training time. The step time is measured first (a few throw-away steps), and the run is planned as
``min(steps, budget / step time)`` steps with the same schedule shape (warm-up, then cosine), so
the schedule still ends where it should.
"""

import math
from dataclasses import asdict, dataclass
from typing import Any

from ...errors import ConfigError

__all__ = ["PAPER_SCHEDULES", "PaperRunConfig", "snapshot_schedule"]

#: preset -> (task, schedule). Bijection: the authors' configs/bijection_v20.yaml; HMM: steps of their
#: re-run, batch and lr ours.
PAPER_SCHEDULES: dict[str, dict[str, Any]] = {
    "bijection-paper": {"task": "bijection", "steps": 100_000, "batch_size": 128, "lr": 3e-4, "warmup": 2000, "loss": "hard"},
    "hmm-paper": {"task": "hmm", "steps": 78_000, "batch_size": 64, "lr": 3e-4, "warmup": 2000, "loss": "soft"},
}


def snapshot_schedule(steps: int, *, dense_every: int = 100, dense_until: int = 1000, n_log: int = 20) -> tuple[int, ...]:
    """Snapshot steps: 0, every ``dense_every`` up to ``dense_until``, then ``n_log`` log-spaced to ``steps``."""
    pts = {0, steps} | {s for s in range(dense_every, min(dense_until, steps) + 1, dense_every)}
    if steps > dense_until and n_log > 0:
        a, b = math.log(dense_until), math.log(steps)
        pts |= {int(round(math.exp(a + (b - a) * i / n_log))) for i in range(1, n_log + 1)}
    return tuple(sorted(p for p in pts if 0 <= p <= steps))


@dataclass(frozen=True, kw_only=True)
class PaperRunConfig:
    """One paper-size run: train, then measure every claim with both protocols.

    Attributes:
        preset: model shape (``bijection-paper``, ``hmm-paper``; a smaller preset for tests).
        task: ``bijection`` or ``hmm`` (None: the preset's).
        steps, batch_size, lr, warmup, loss: the schedule (None: the paper schedule's).
        time_budget_s: cap on the training time (None: no cap, train ``steps``).
        seed: model init and data.
        device: ``cpu``, ``cuda`` or ``cuda:N``.
        bf16: bf16 autocast for training on CUDA (measurements run in float32 afterwards).
        dense_every, dense_until, n_log_snapshots: the snapshot schedule (:func:`snapshot_schedule`).
        eval_every, n_eval: calibration during training.
        quick_report: the report's quick mode (fewer sequences and snapshots).
        keep_snapshots: keep the fp16 snapshots in the output (else only their measurements).
    """

    preset: str = "bijection-paper"
    task: str | None = None
    steps: int | None = None
    batch_size: int | None = None
    lr: float | None = None
    warmup: int | None = None
    loss: str | None = None
    time_budget_s: float | None = 360.0
    seed: int = 0
    device: str = "cuda"
    bf16: bool = True
    dense_every: int = 100
    dense_until: int = 1000
    n_log_snapshots: int = 20
    eval_every: int = 2000
    n_eval: int = 256
    quick_report: bool = False
    keep_snapshots: bool = False

    def __post_init__(self) -> None:
        from ...models.presets import PRESETS

        if self.preset not in PRESETS:
            raise ConfigError(f"unknown preset {self.preset!r}; accepted: {sorted(PRESETS)}")
        if self.task is not None and self.task not in ("bijection", "hmm"):
            raise ConfigError(f"task must be 'bijection' or 'hmm'; got {self.task!r}")
        for name in ("steps", "batch_size", "warmup"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < (0 if name == "warmup" else 1)):
                raise ConfigError(f"{name} must be a {'non-negative' if name == 'warmup' else 'positive'} int or None; got {v!r}")
        for name in ("dense_every", "dense_until", "eval_every", "n_eval"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"{name} must be a positive int; got {v!r}")
        if isinstance(self.n_log_snapshots, bool) or not isinstance(self.n_log_snapshots, int) or self.n_log_snapshots < 0:
            raise ConfigError(f"n_log_snapshots must be an int >= 0; got {self.n_log_snapshots!r}")
        if self.lr is not None and not (isinstance(self.lr, int | float) and self.lr > 0 and math.isfinite(self.lr)):
            raise ConfigError(f"lr must be a positive finite number or None; got {self.lr!r}")
        if self.time_budget_s is not None and not (isinstance(self.time_budget_s, int | float) and self.time_budget_s > 0):
            raise ConfigError(f"time_budget_s must be positive or None; got {self.time_budget_s!r}")
        if self.loss not in (None, "hard", "soft"):
            raise ConfigError(f"loss must be 'hard', 'soft' or None; got {self.loss!r}")
        dev, _, index = str(self.device).partition(":")
        if dev not in ("cpu", "cuda") or (index and (dev != "cuda" or not index.isdigit())):
            raise ConfigError(f"device must be cpu, cuda or cuda:N; got {self.device!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ConfigError(f"seed must be an int >= 0; got {self.seed!r}")
        if self.task is None and self.preset not in PAPER_SCHEDULES:
            raise ConfigError(f"preset {self.preset!r} has no paper schedule: give task")

    def schedule(self) -> dict[str, Any]:
        """The resolved schedule: the paper schedule of the preset (or the task's), overridden field by field."""
        base = PAPER_SCHEDULES.get(self.preset) or next(v for v in PAPER_SCHEDULES.values() if v["task"] == self.task)
        out = dict(base)
        for name in ("task", "steps", "batch_size", "lr", "warmup", "loss"):
            if getattr(self, name) is not None:
                out[name] = getattr(self, name)
        return out

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "PaperRunConfig":
        return cls(**d)
