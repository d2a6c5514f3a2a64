"""Accumulator state as plain data, and the scan's resumable checkpoints.

:func:`encode_state` walks ``vars(accumulator)`` and turns it into a plain structure of tensors,
numbers, strings and dicts/lists/tuples of them (numpy arrays and numpy scalars become tagged
tensors; nested objects, e.g. a :class:`~bayesmanifold.analyses.HeadStats` table, become tagged
dicts of their own ``vars``). It is saved with ``torch.save`` and loaded with
``torch.load(weights_only=True)``: no pickled code. :func:`restore_state` writes such a structure
back into a freshly constructed accumulator, so the analyses need no serialisation code of their
own, and a restored accumulator finalizes to exactly the original's result.

A scan checkpoint (:func:`save_checkpoint`) holds the run's identity (model, data and
configuration fingerprints), the part of the corpus it covers, the position reached (next batch)
and the accumulators' states; it is written atomically (temporary file, then rename).
"""

import importlib
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..errors import CheckpointError, InputError
from ..io import atomic_torch_save

__all__ = ["encode_state", "decode_state", "restore_state", "save_checkpoint", "load_checkpoint", "FORMAT_VERSION"]

FORMAT_VERSION = 1
_ND, _NPS, _OBJ = "__ndarray__", "__npscalar__", "__object__"


def encode_state(obj: Any) -> dict[str, Any]:
    """``vars(obj)`` as plain data (see the module doc); ``obj`` is not changed."""
    return {k: _enc(v, f"{type(obj).__name__}.{k}") for k, v in vars(obj).items()}


def _enc(v: Any, where: str) -> Any:
    if v is None or isinstance(v, bool | int | float | str):
        return v
    if isinstance(v, Tensor):
        return v.detach().to("cpu").clone()
    if isinstance(v, np.ndarray):
        if v.dtype == object:
            raise InputError(f"cannot serialise {where}: a numpy array of Python objects")
        return {_ND: torch.from_numpy(np.ascontiguousarray(v).copy())}
    if isinstance(v, np.generic):
        return {_NPS: torch.from_numpy(np.asarray(v).reshape(1).copy())}
    if isinstance(v, list | tuple):
        out = [_enc(x, f"{where}[{i}]") for i, x in enumerate(v)]
        return out if isinstance(v, list) else tuple(out)
    if isinstance(v, dict):
        for k in v:
            if not isinstance(k, int | str | tuple):
                raise InputError(f"cannot serialise {where}: dict key {k!r} of type {type(k).__name__}")
        return {k: _enc(x, f"{where}[{k!r}]") for k, x in v.items()}
    if isinstance(v, torch.dtype):
        return {_OBJ: "torch.dtype", "name": str(v).removeprefix("torch.")}
    if hasattr(v, "__dict__") and type(v).__module__.startswith("bayesmanifold."):
        return {_OBJ: f"{type(v).__module__}:{type(v).__qualname__}", "vars": {k: _enc(x, f"{where}.{k}") for k, x in vars(v).items()}}
    raise InputError(f"cannot serialise {where}: a {type(v).__name__} (accumulator state must be tensors, arrays, numbers and containers)")


def decode_state(v: Any) -> Any:
    """The Python values of an encoded structure (numpy arrays back, objects rebuilt)."""
    if isinstance(v, Tensor):
        return v.clone()
    if isinstance(v, list):
        return [decode_state(x) for x in v]
    if isinstance(v, tuple):
        return tuple(decode_state(x) for x in v)
    if isinstance(v, dict):
        if _ND in v:
            return v[_ND].numpy().copy()
        if _NPS in v:
            return v[_NPS].numpy()[0]
        if _OBJ in v:
            return _rebuild(v)
        return {k: decode_state(x) for k, x in v.items()}
    return v


def _rebuild(v: dict) -> Any:
    if v[_OBJ] == "torch.dtype":
        return getattr(torch, v["name"])
    module, _, name = v[_OBJ].partition(":")
    if not module.startswith("bayesmanifold."):
        raise CheckpointError(f"refusing to rebuild an object of {module}: not part of bayesmanifold")
    cls: Any = importlib.import_module(module)
    for part in name.split("."):
        cls = getattr(cls, part)
    obj = cls.__new__(cls)
    for k, x in v["vars"].items():
        setattr(obj, k, decode_state(x))
    return obj


def restore_state(acc: Any, state: dict[str, Any]) -> Any:
    """Write an :func:`encode_state` structure into ``acc`` (freshly constructed, same class and
    arguments) and return it. Nested objects the fresh accumulator already holds are restored in
    place, so their class and configuration stay those of the constructor."""
    for k, x in state.items():
        cur = getattr(acc, k, None)
        if isinstance(x, dict) and _OBJ in x and x[_OBJ] != "torch.dtype" and cur is not None and hasattr(cur, "__dict__"):
            if f"{type(cur).__module__}:{type(cur).__qualname__}" != x[_OBJ]:
                raise CheckpointError(f"{type(acc).__name__}.{k}: the saved state holds a {x[_OBJ]}, the accumulator a {type(cur).__name__}")
            restore_state(cur, x["vars"])
        else:
            setattr(acc, k, decode_state(x))
    return acc


# ------------------------------------------------------------------------------------ checkpoints
def save_checkpoint(path: str | os.PathLike, *, identity: dict, part: dict, next_batch: int, n_tokens: int,
                    n_sequences: int, accumulators: dict[str, Any], complete: bool, extra: dict | None = None) -> Path:
    """Write a scan checkpoint atomically."""
    payload = {
        "format_version": FORMAT_VERSION,
        "identity": identity,
        "part": part,
        "next_batch": int(next_batch),
        "n_tokens": int(n_tokens),
        "n_sequences": int(n_sequences),
        "complete": bool(complete),
        "accumulators": {name: encode_state(acc) for name, acc in accumulators.items()},
        "extra": extra or {},
    }
    return atomic_torch_save(path, payload)


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Read a scan checkpoint (tensors and plain data only)."""
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"no scan state at {str(p)!r}")
    try:
        data = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a corrupt or foreign file
        raise CheckpointError(f"{str(p)!r} is not a readable scan state ({type(exc).__name__}: {exc})") from None
    if not isinstance(data, dict) or data.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{str(p)!r} is not a scan state of format version {FORMAT_VERSION}")
    return data
