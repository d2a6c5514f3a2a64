"""Helpers shared by the wind-tunnel commands (train, calibrate): task parameters and devices."""

import shlex
from typing import Any

import torch

from ..errors import ConfigError, TaskError
from ..windtunnels.registry import TASKS, task_from_dict

__all__ = ["parse_params", "make_task", "resolve_device", "quote_command"]

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


def resolve_device(name: str) -> str:
    """``"auto"`` -> cuda when available else cpu; checks that cuda exists when asked for."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"--device {name} requested but CUDA is not available; use cpu or auto")
    if name != "cpu" and not name.startswith("cuda") and name != "mps":
        raise ConfigError(f"--device must be cpu, cuda[:N], mps or auto; got {name!r}")
    return name


def quote_command(parts: list[str]) -> str:
    return " ".join(shlex.quote(p) for p in parts)
