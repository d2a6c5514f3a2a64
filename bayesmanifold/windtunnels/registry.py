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
    accepted = task_parameters(name)
    unknown = sorted(k for k in d if k != "task" and accepted and k not in accepted)
    if unknown:
        raise TaskError(f"unknown parameter{'s' if len(unknown) > 1 else ''} {', '.join(unknown)} for task {name!r}; "
                        f"accepted: {', '.join(accepted)}")
    try:
        return TASKS[name].from_dict(d)
    except TypeError as exc:
        raise TaskError(f"bad parameters for task {name!r} ({exc}); accepted: {', '.join(accepted)}") from None


def task_parameters(name: str) -> list[str]:
    """The parameter names task ``name`` accepts (its constructor's keyword arguments)."""
    import inspect

    sig = inspect.signature(TASKS[name].__init__)
    return [p.name for p in list(sig.parameters.values())[1:]
            if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
