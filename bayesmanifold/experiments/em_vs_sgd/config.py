"""Settings of Paper II's EM-like vs SGD experiment (arXiv 2512.22473, section 5.2).

The model's sizes (``W_Q, W_K ∈ R^{20×10}``, ``W_V ∈ R^{20×15}``, ``W_O ∈ R^{15×8}``), the
paper's seeds, and :class:`EMvsSGDConfig`, validated on construction.
"""

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch

from ...errors import ConfigError
from ...windtunnels.sticky_chain import StickyChainConfig

__all__ = ["DEFAULT_SEEDS", "EMvsSGDConfig", "seeds_for"]

DEFAULT_SEEDS = (42, 2024, 1337, 7777, 9999)
TEST_OFFSET = 10000  # held-out sequence of a run: its sequence seed + 10000 (as the deep variant)
D_IN, D_HEAD, D_VALUE, N_STATES = 20, 10, 15, 8


def _pos_number(name: str, v: Any) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
        raise ConfigError(f"{name} must be a finite number > 0; got {v!r}")
    return float(v)


def _pos_int(name: str, v: Any) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
        raise ConfigError(f"{name} must be an int > 0; got {v!r}")
    return v


@dataclass(frozen=True, kw_only=True)
class EMvsSGDConfig:
    """Settings of the EM-like vs SGD experiment (defaults: the paper's, plus every control).

    Attributes:
        seeds: training seeds (init, and the data sequence unless ``data_seed`` is set).
        steps: full-batch steps per run.
        lr: SGD learning rate on every matrix (and on Q, K, O for EM-like and the M-step).
        value_lr: the EM-like schedule's learning rate on ``W_V``.
        uniform_lr: the step-size-matched control's learning rate on every matrix.
        adam_lrs: grid on which Adam's learning rate is tuned: the lr with the lowest loss on a
            fresh sequence (``tune_seed + 10000``) after training on ``tune_seed``'s sequence.
        tune_seed: held-out seed used only to tune Adam.
        m_step_size: ``η_M`` of the closed-form M-step control.
        stickiness: the chain's stated stickiness (0.3; effective self-transition 0.3498).
        data_seed: None: each seed samples its own sequence (the released script); an int: one
            sequence shared by every run.
        controls: run the controls (uniform lr, Adam, M-step, literal 0.3 stickiness).
        tile: query-block size of the tiled attention pass (64: a block of ``batch_chunk`` runs
            stays within a few MB, near the CPU caches).
        batch_chunk: at most this many runs per batched pass: the runs are split into
            ``ceil(runs / batch_chunk)`` near-equal contiguous blocks (at least two when there are
            two runs or more, so that two cores share even a small batch).
        workers: CPU processes that train the blocks side by side: this one and ``workers - 1``
            worker processes (:mod:`bayesmanifold.experiments.em_vs_sgd.worker`), each on one
            thread (None: ``torch.get_num_threads()``; always 1 on a GPU). The numbers do not
            depend on it: the blocks are the same for any number of workers.
        device: torch device.
        probes: record weights at ``n_checkpoints`` checkpoints of one seed per method, for
            :mod:`bayesmanifold.experiments.em_vs_sgd.probes`.
        n_checkpoints: number of checkpoints after step 0.
    """

    seeds: tuple[int, ...] = DEFAULT_SEEDS
    steps: int = 1000
    lr: float = 0.01
    value_lr: float = 0.1
    uniform_lr: float = 0.1
    adam_lrs: tuple[float, ...] = (0.0001, 0.0003, 0.001, 0.003, 0.01, 0.03)
    tune_seed: int = 0
    m_step_size: float = 1.0
    stickiness: float = 0.3
    data_seed: int | None = None
    controls: bool = True
    tile: int = 64
    batch_chunk: int = 6
    workers: int | None = None
    device: str = "cpu"
    probes: bool = False
    n_checkpoints: int = 20

    def __post_init__(self) -> None:
        seeds = self.seeds
        if isinstance(seeds, int) or not isinstance(seeds, Sequence) or len(seeds) == 0:
            raise ConfigError(f"seeds must be a non-empty sequence of ints; got {seeds!r}")
        for s in seeds:
            if isinstance(s, bool) or not isinstance(s, int):
                raise ConfigError(f"every seed must be an int; got {s!r}")
        if len(set(seeds)) != len(seeds):
            raise ConfigError(f"seeds must be distinct; got {seeds!r}")
        object.__setattr__(self, "seeds", tuple(seeds))
        _pos_int("steps", self.steps)
        for name in ("lr", "value_lr", "uniform_lr", "m_step_size"):
            _pos_number(name, getattr(self, name))
        if isinstance(self.adam_lrs, (int, float)) or len(self.adam_lrs) == 0:
            raise ConfigError(f"adam_lrs must be a non-empty sequence; got {self.adam_lrs!r}")
        for v in self.adam_lrs:
            _pos_number("adam_lrs entry", v)
        object.__setattr__(self, "adam_lrs", tuple(float(v) for v in self.adam_lrs))
        if isinstance(self.tune_seed, bool) or not isinstance(self.tune_seed, int):
            raise ConfigError(f"tune_seed must be an int; got {self.tune_seed!r}")
        if self.data_seed is not None and (isinstance(self.data_seed, bool) or not isinstance(self.data_seed, int)):
            raise ConfigError(f"data_seed must be an int or None; got {self.data_seed!r}")
        StickyChainConfig(stickiness=self.stickiness)  # TaskError outside [0, 1)
        _pos_int("tile", self.tile)
        _pos_int("batch_chunk", self.batch_chunk)
        if self.workers is not None:
            _pos_int("workers", self.workers)
        _pos_int("n_checkpoints", self.n_checkpoints)
        try:
            torch.device(self.device)
        except (RuntimeError, TypeError) as exc:
            raise ConfigError(f"device {self.device!r} is not a torch device: {exc}") from None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["seeds"] = list(self.seeds)
        d["adam_lrs"] = list(self.adam_lrs)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "EMvsSGDConfig":
        unknown = set(d) - set(cls.__dataclass_fields__) - {"threads"}
        if unknown:
            raise ConfigError(f"unknown EMvsSGDConfig fields {sorted(unknown)}")
        d = dict(d)
        if "threads" in d:  # the field's name in configs written before the worker processes
            if "workers" in d:
                raise ConfigError("EMvsSGDConfig takes workers or its former name threads, not both")
            d["workers"] = d.pop("threads")
        for k in ("seeds", "adam_lrs"):
            if k in d:
                d[k] = tuple(d[k])
        return cls(**d)



def seeds_for(n: int) -> tuple[int, ...]:
    """The paper's seeds (42, 2024, 1337, 7777, 9999) cut to ``n``, or extended with 1, 2, ...."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ConfigError(f"the number of seeds must be an int >= 1; got {n!r}")
    extra = tuple(range(1, n - len(DEFAULT_SEEDS) + 1))
    return (DEFAULT_SEEDS + extra)[:n]

