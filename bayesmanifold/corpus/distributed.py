"""Processes of one scan: torch.distributed when launched by torchrun, else a single process.

Under ``torchrun`` (``WORLD_SIZE`` > 1 in the environment) :func:`process_group` initialises a
``gloo`` process group from torchrun's variables (``env://``) unless the caller already has one,
and destroys the group it created on exit. Only accumulator *states* travel between processes
(:func:`gather`, an ``all_gather_object`` of small dicts of tensors and numbers); activations
never do. Nothing is written to the environment.
"""

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch.distributed as dist

from ..errors import ConfigError

__all__ = ["ProcessInfo", "process_group", "gather", "env_world_size"]


@dataclass(frozen=True)
class ProcessInfo:
    """This process's rank among ``world_size`` processes (0 of 1 without torch.distributed)."""

    rank: int = 0
    world_size: int = 1

    @property
    def is_writer(self) -> bool:
        return self.rank == 0


def env_world_size() -> int:
    """``WORLD_SIZE`` from torchrun's environment (1 when unset)."""
    raw = os.environ.get("WORLD_SIZE", "1")
    try:
        return int(raw)
    except ValueError:
        raise ConfigError(f"WORLD_SIZE={raw!r} in the environment is not an integer") from None


@contextlib.contextmanager
def process_group(timeout_s: float = 86400.0) -> Iterator[ProcessInfo]:
    """The scan's processes: an existing process group, one made from torchrun's environment
    (destroyed on exit), or this process alone.

    The timeout is long because a rank that finishes (or resumes) early legitimately waits for
    the others at the final gather; torchrun ends the whole group if one process dies."""
    if dist.is_available() and dist.is_initialized():
        yield ProcessInfo(dist.get_rank(), dist.get_world_size())
        return
    if env_world_size() <= 1:
        yield ProcessInfo()
        return
    if not dist.is_available():
        raise ConfigError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    missing = [k for k in ("MASTER_ADDR", "MASTER_PORT", "RANK") if k not in os.environ]
    if missing:
        raise ConfigError(f"WORLD_SIZE > 1 but {', '.join(missing)} not set: launch with torchrun")
    dist.init_process_group("gloo", init_method="env://", timeout=timedelta(seconds=timeout_s))
    try:
        yield ProcessInfo(dist.get_rank(), dist.get_world_size())
    finally:
        dist.destroy_process_group()


def gather(obj: Any, info: ProcessInfo) -> list[Any]:
    """Every process's ``obj``, in rank order (``[obj]`` for one process)."""
    if info.world_size == 1:
        return [obj]
    out: list[Any] = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def barrier(info: ProcessInfo) -> None:
    if info.world_size > 1:
        dist.barrier()
