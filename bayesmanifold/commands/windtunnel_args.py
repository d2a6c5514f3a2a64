"""Helpers of the wind-tunnel commands (train): task parameters and the recorded command line."""

import shlex
from typing import Any

from ..errors import TaskError
from ..windtunnels.registry import TASKS, task_from_dict

__all__ = ["parse_params", "make_task", "quote_command"]

DEFAULT_TASK_PARAMS: dict[str, dict[str, Any]] = {
    "bijection": {"V": 20, "L": 19},
    "hmm": {"S": 5, "O": 5, "K": 20},
    "recall": {},
}


def _coerce(text: str) -> Any:
    low = text.lower()
    if low in ("true", "false"):
        return low == "true"
    try:
        return int(text)
    except ValueError:
        pass
    try:
        return float(text)
    except ValueError:
        return text


def parse_params(items: "list[str] | None") -> dict[str, Any]:
    """``["K=20", "replacement=true"]`` -> ``{"K": 20, "replacement": True}``."""
    out: dict[str, Any] = {}
    for item in items or []:
        if "=" not in item:
            raise TaskError(f"task parameter {item!r} must look like NAME=VALUE (e.g. K=20)")
        k, v = item.split("=", 1)
        out[k.strip()] = _coerce(v.strip())
    return out


def make_task(name: str, params: dict[str, Any]):
    """The task ``name`` with the paper's defaults overridden by ``params``."""
    if name not in TASKS:
        raise TaskError(f"unknown task {name!r}; accepted: {sorted(TASKS)}")
    return task_from_dict({"task": name, **DEFAULT_TASK_PARAMS.get(name, {}), **params})


def quote_command(parts: list[str]) -> str:
    return " ".join(shlex.quote(p) for p in parts)
