"""Task names for configs and the command line: ``task_from_dict({"task": "hmm", "K": 20})``."""

from typing import Any

from ..errors import TaskError
from .base import WindTunnel
from .bijection import BijectionTask
from .hmm import HMMTask
from .recall import RecallTask
from .text_corpus import TextCorpusTask

__all__ = ["TASKS", "task_from_dict"]

TASKS: dict[str, type] = {"bijection": BijectionTask, "hmm": HMMTask, "recall": RecallTask, "text": TextCorpusTask}


def task_from_dict(d: dict[str, Any]) -> WindTunnel:
    """Rebuild a task from ``task.to_dict()`` (the ``"task"`` key names its class)."""
    if not isinstance(d, dict) or "task" not in d:
        raise TaskError(f"a task dict needs a 'task' key naming one of {sorted(TASKS)}; got {d!r}")
    name = d["task"]
    if name not in TASKS:
        raise TaskError(f"unknown task {name!r}; accepted: {sorted(TASKS)}")
    try:
        return TASKS[name].from_dict(d)
    except TypeError as exc:
        raise TaskError(f"bad parameters for task {name!r}: {exc}") from None
