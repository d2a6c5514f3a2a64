"""Atomic file writing: write to a temporary name in the same directory, then rename.

A crash or an interrupt never leaves a half-written file under the final name.
"""

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .errors import BayesManifoldError

__all__ = ["cache_dir", "atomic_write", "atomic_write_text", "atomic_write_json", "atomic_torch_save", "ensure_dir"]


def cache_dir() -> Path:
    """Where converted models and built kernels are cached: ``$BAYESMANIFOLD_CACHE``, else ``$XDG_CACHE_HOME/bayesmanifold``,
    else ``~/.cache/bayesmanifold``."""
    env = os.environ.get("BAYESMANIFOLD_CACHE")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "bayesmanifold"


def ensure_dir(path: str | os.PathLike) -> Path:
    """Create ``path`` (and parents) and check that it is a writable directory."""
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise BayesManifoldError(f"output path {str(p)!r} exists and is not a directory")
    try:
        p.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise BayesManifoldError(f"cannot create output directory {str(p)!r}: {exc.strerror}") from None
    if not p.is_dir():
        raise BayesManifoldError(f"output path {str(p)!r} exists and is not a directory")
    if not os.access(p, os.W_OK):
        raise BayesManifoldError(f"output directory {str(p)!r} is not writable")
    return p


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp_path)`` on a temporary file beside ``path``, then rename it to ``path``."""
    final = Path(path)
    parent = ensure_dir(final.parent if str(final.parent) else ".")
    fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp", dir=parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        os.chmod(tmp_path, 0o666 & ~_umask())  # mkstemp makes 0600; give the usual permissions
        write(tmp_path)
        os.replace(tmp_path, final)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise
    return final


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` atomically (UTF-8)."""
    return atomic_write(path, lambda p: p.write_text(text, encoding="utf-8"))


def _json_default(obj: Any) -> Any:
    import numpy as np

    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def atomic_write_json(path: str | os.PathLike, data: Any) -> Path:
    """Write ``data`` as indented JSON atomically; numpy and torch scalars/arrays are converted."""
    return atomic_write_text(path, json.dumps(data, indent=2, default=_json_default) + "\n")


def atomic_torch_save(path: str | os.PathLike, obj: Any) -> Path:
    """``torch.save`` to ``path`` atomically."""
    import torch

    return atomic_write(path, lambda p: torch.save(obj, p))
