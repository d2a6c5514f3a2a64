"""Build the fused C kernels once per machine and load them (ctypes), or say why not.

The source (``tile_stats.c`` beside this file) is compiled at first use with the system's C
compiler (``$CC``, else the compiler Python was built with, else ``cc``/``gcc``/``clang``) into
:func:`~bayesmanifold.io.cache_dir` ``/kernels``, named by a hash of the source, the compiler's
version, the flags and the CPU, so a changed source, compiler or machine builds afresh. The
library is written under a temporary name and renamed (processes building at once each rename a
complete file). OpenMP is used when the compiler has it (``-fopenmp``; the library then shares
the OpenMP runtime PyTorch has loaded), else the kernels run on one thread (``-fopenmp-simd``).

Nothing here raises on a machine without a compiler: :func:`load` returns ``None`` and
:func:`status` says why; the accumulators then take their PyTorch path.
"""

import ctypes
import hashlib
import os
import platform
import shlex
import shutil
import subprocess
import sysconfig
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

from ..io import cache_dir

__all__ = ["KernelStatus", "load", "status"]

SOURCE = Path(__file__).with_name("tile_stats.c")
# No -ffast-math: NaN and infinity keep their meaning; `omp simd` reductions may reorder sums.
_BASE_FLAGS = ["-O3", "-fPIC", "-shared", "-fno-math-errno", "-fno-trapping-math", "-fno-signed-zeros"]
_VARIANTS = (["-march=native", "-fopenmp"], ["-fopenmp"], ["-march=native", "-fopenmp-simd"], ["-fopenmp-simd"])


@dataclass(frozen=True)
class KernelStatus:
    """Whether the fused kernels are usable here: ``path`` of the built library, ``flags`` it was
    built with, ``threaded`` (OpenMP), or ``reason`` they are not."""

    available: bool
    path: str | None = None
    flags: tuple[str, ...] = ()
    threaded: bool = False
    reason: str = ""


_lock = threading.Lock()
_state: dict[str, object] = {}


def _compiler() -> list[str] | None:
    """The compiler's command line (``$CC`` may carry a launcher or flags, e.g. ``ccache gcc``)."""
    for cmd in (os.environ.get("CC", ""), sysconfig.get_config_var("CC") or "", "cc", "gcc", "clang"):
        try:
            argv = shlex.split(cmd)
        except ValueError:
            continue
        if argv and shutil.which(argv[0]):
            return [shutil.which(argv[0]), *argv[1:]]
    return None


def _cpu_tag() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            flags = next((ln for ln in f if ln.startswith(("flags", "Features"))), "")
    except OSError:
        flags = ""
    return f"{platform.machine()} {platform.processor()} {flags.strip()}"


def _version(cc: list[str]) -> str:
    try:
        out = subprocess.run([*cc, "--version"], capture_output=True, text=True, timeout=30)
        return out.stdout.splitlines()[0] if out.stdout else ""
    except (OSError, subprocess.SubprocessError):
        return ""


def _build(cc: list[str], flags: list[str], out: Path) -> str:
    """Compile into ``out`` (atomically); return '' or the compiler's complaint."""
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    os.close(fd)
    try:
        proc = subprocess.run([*cc, *flags, str(SOURCE), "-o", tmp, "-lm"], capture_output=True, text=True, timeout=300)
        if proc.returncode != 0:
            lines = (proc.stderr or proc.stdout).strip().splitlines()
            return next((ln for ln in lines if "error" in ln), lines[-1] if lines else f"exit status {proc.returncode}")
        os.replace(tmp, out)
        return ""
    except (OSError, subprocess.SubprocessError) as exc:
        return str(exc)
    finally:
        Path(tmp).unlink(missing_ok=True)


def _declare(lib: ctypes.CDLL) -> ctypes.CDLL:
    i, i64, p = ctypes.c_int, ctypes.c_int64, ctypes.c_void_p
    lib.adv_rows.argtypes = [i, i, i, i, p, p, p, i64, i64, i64, p, i64, i64, p, i64, i64, p, i]
    lib.law_rows.argtypes = [i, i, i, i, p, p, p, i64, i64, i64, p, p, i64, i64, p, i64, i64, i]
    lib.entropy_rows.argtypes = [i, i, i, i, p, i64, i64, i64, p, i64, i64, i]
    for f in (lib.adv_rows, lib.law_rows, lib.entropy_rows):
        f.restype = None
    return lib


def _load() -> tuple[ctypes.CDLL | None, KernelStatus]:
    if not SOURCE.is_file():
        return None, KernelStatus(False, reason=f"the kernel source {SOURCE.name} is missing from the installation")
    cc = _compiler()
    if cc is None:
        return None, KernelStatus(False, reason="no C compiler found ($CC, cc, gcc or clang)")
    src = SOURCE.read_bytes()
    ident = [" ".join(cc), _version(cc), _cpu_tag(), platform.python_implementation()]
    complaints = []
    for extra in _VARIANTS:
        flags = [*_BASE_FLAGS, *extra]
        digest = hashlib.sha256(b"\0".join([src, *(s.encode() for s in [*ident, *flags])])).hexdigest()[:16]
        path = cache_dir() / "kernels" / f"tile_stats-{digest}.so"
        if not path.is_file():
            err = _build(cc, flags, path)
            if err:
                complaints.append(f"{' '.join(extra)}: {err}")
                continue
        try:
            lib = _declare(ctypes.CDLL(str(path)))
        except OSError as exc:
            complaints.append(f"{' '.join(extra)}: cannot load {path.name}: {exc}")
            continue
        return lib, KernelStatus(True, str(path), tuple(flags), "-fopenmp" in extra)
    return None, KernelStatus(False, reason=f"{Path(cc[0]).name} could not build the kernels: " + "; ".join(complaints))


def load() -> ctypes.CDLL | None:
    """The kernel library, built on first use (about a quarter of a second), or None."""
    with _lock:
        if "lib" not in _state:
            try:
                _state["lib"], _state["status"] = _load()
            except OSError as exc:  # e.g. an unwritable cache directory
                _state["lib"], _state["status"] = None, KernelStatus(False, reason=f"cannot build the kernels: {exc}")
        return _state["lib"]  # type: ignore[return-value]


def status() -> KernelStatus:
    """Whether the fused kernels are usable (builds them if not yet tried)."""
    load()
    return _state["status"]  # type: ignore[return-value]
