"""Fused C kernels for the per-entry statistics of attention tiles (CPU, float32).

The accumulators of :mod:`bayesmanifold.analyses` make several elementwise passes over every
(query, key) entry of every head; on a CPU each pass streams the tile through memory again. These
kernels make one pass per row instead, vectorised and threaded. They are built at first use with
the system's C compiler (:mod:`.build`) and used where they apply (contiguous float32 CPU tensors);
without a compiler, on a GPU, or in float64 the accumulators take their PyTorch path, which
computes the same statistics (results agree to float32 rounding; tests hold the two together).
:func:`status` says whether they are in use and why not.
"""

from .build import KernelStatus, status
from .rows import ADVANTAGE_ROWS, LAW_ROWS, advantage_rows, entropy_rows, law_rows, usable

__all__ = ["KernelStatus", "status", "usable", "advantage_rows", "law_rows", "entropy_rows", "ADVANTAGE_ROWS", "LAW_ROWS"]
