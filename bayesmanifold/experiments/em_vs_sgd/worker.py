"""Worker processes for the batched EM-vs-SGD training: groups of runs trained side by side.

The runs of a batch never interact, so a group of them can be trained start to finish in another
process: the parent sends the group's rows (specs, data, settings) once, and gets its curves,
metrics, snapshots and final weights back once. Python threads in one process are slowed by each
other (the interpreter lock is taken and released around every tensor op of the tiled pass, and
the kernel's ops are short): on the 2-core CPU machine 36 runs × 150 steps took 6.5–6.6 ms per
model-step on two threads and 5.8–5.9 ms on two processes.

A worker is a fresh interpreter (``sys.executable -c``) that takes the caller's ``sys.path``,
imports the trainer module and calls its ``worker_main``: the caller's ``__main__`` is never re-imported
(unlike ``multiprocessing``'s spawn), and the package it runs is the caller's, whatever the
working directory holds. It runs on one intra-op thread with the C allocator tuned in its own
process, and dies with its parent on Linux. The job and its result travel through its stdin and
stdout as ``torch.save`` payloads, loaded with ``weights_only=True``. The caller's environment
and threads are not changed.
"""

import ctypes
import ctypes.util
import io
import json
import os
import signal
import subprocess
import sys
import threading
from typing import Any

import torch

__all__ = ["WorkerProcess"]

# the module whose worker_main a worker runs (named, not imported: the trainer imports this module)
_ENTRY = __name__.rsplit(".", 1)[0] + ".trainer"

_PATH_VAR = "BAYESMANIFOLD_WORKER_SYS_PATH"  # set in the worker's environment only


def _dumps(obj: Any) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _loads(data: bytes) -> Any:
    return torch.load(io.BytesIO(data), weights_only=True)


class WorkerProcess:
    """One job in a worker process, started at once; :meth:`result` waits for it.

    Args:
        job: keyword arguments of :func:`~.trainer.train_group` (tensors, numbers, lists,
            tuples, dicts, strings only).
    """

    def __init__(self, job: dict[str, Any]) -> None:
        env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", **{_PATH_VAR: json.dumps(sys.path)})
        code = f"import json, os, sys; sys.path[:] = json.loads(os.environ.pop({_PATH_VAR!r})); " \
               f"from {_ENTRY} import worker_main; worker_main()"
        self._proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, env=env)
        self._out: tuple[bytes, bytes] | None = None
        self._thread = threading.Thread(target=self._talk, args=(_dumps(job),), daemon=True)
        self._thread.start()

    def _talk(self, payload: bytes) -> None:
        self._out = self._proc.communicate(payload)

    def result(self) -> dict[str, Any]:
        """The job's result; RuntimeError (with the end of the worker's stderr) if it failed."""
        self._thread.join()
        out, err = self._out if self._out is not None else (b"", b"")
        if self._proc.returncode != 0:
            tail = err.decode(errors="replace").strip()[-2000:]
            raise RuntimeError(f"an EM-vs-SGD worker process failed (exit {self._proc.returncode}): {tail}")
        return _loads(out)

    def kill(self) -> None:
        """Stop the worker if it still runs (the caller failed or was interrupted)."""
        if self._proc.poll() is None:
            self._proc.kill()
        self._thread.join()


def _die_with_parent() -> None:
    """On Linux, ask the kernel to stop this process if its parent dies (no orphaned training)."""
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass
