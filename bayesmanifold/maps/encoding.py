"""The page's compact encoding of one head's matrices: 8-bit logarithmic codes, deflated, base64.

A page that holds every head of a real model (270 heads × 256² entries × 2 matrices) cannot carry
numbers as text (that was 305 MB for 199 tokens). Per head it carries α and the routing force as
one byte per entry each, compressed with zlib (the browser's ``DecompressionStream('deflate')``
inflates only the head the reader picks):

- α: code 0 is 0 (below ~1e-6); code c in 1..255 is ``10 ** (-ALPHA_DECADES * (255 - c) / 254)``,
  so α from 1e-6 to 1 is kept to ±2.8 % (half a step of 10^(6/254)).
- force: code 255 is masked (the query cannot see the key), 0 is 0 (below ``fmax`` ×
  10^-FORCE_DECADES); c in 1..127 is ``+fmax * 10 ** (-FORCE_DECADES * (127 - c) / 126)`` and
  c in 128..254 is ``-fmax * 10 ** (-FORCE_DECADES * (c - 128) / 126)``: ±4.7 % of the value over five decades
  below the head's max |force| ``fmax`` (stored beside, as text).

The masked upper triangle is one repeated code, which deflate reduces to almost nothing. The
advantage A and b are shown as derived values (A = force / α, b = b̄ − A), hence approximate; the
exact float values are in the map's ``.npz``.
"""

import base64
import zlib

import numpy as np

__all__ = ["ALPHA_DECADES", "FORCE_DECADES", "encode_head", "decode_head"]

ALPHA_DECADES = 6.0
FORCE_DECADES = 5.0


def _log_codes(x: np.ndarray, decades: float, levels: int) -> np.ndarray:
    """Codes 0..levels−1 for magnitudes in (0, 1]: levels−1 at 1, 1 at 10^-decades, 0 below."""
    with np.errstate(divide="ignore", invalid="ignore"):
        t = (levels - 1) + np.log10(x) * (levels - 2) / decades
    return np.clip(np.rint(np.nan_to_num(t, nan=0.0, neginf=0.0)), 0, levels - 1).astype(np.int16)


def encode_head(pattern: np.ndarray, force: np.ndarray) -> tuple[str, float]:
    """``(base64 of zlib(α codes ‖ force codes), fmax)`` for one head's ``[query, key]`` matrices
    (force NaN where masked)."""
    a = np.asarray(pattern, dtype=np.float64)
    f = np.asarray(force, dtype=np.float64)
    masked = ~np.isfinite(f)
    fmax = float(np.nanmax(np.abs(f))) if (~masked).any() else 0.0
    ca = _log_codes(np.where(masked, 0.0, a), ALPHA_DECADES, 256).astype(np.uint8)
    mag = _log_codes(np.abs(np.nan_to_num(f)) / (fmax or 1.0), FORCE_DECADES, 128)
    cf = np.where(masked, 255, np.where((mag > 0) & (f < 0), 255 - mag, mag)).astype(np.uint8)
    raw = ca.tobytes() + cf.tobytes()
    return base64.b64encode(zlib.compress(raw, 6)).decode("ascii"), fmax


def decode_head(blob: str, fmax: float, n: int) -> tuple[np.ndarray, np.ndarray]:
    """The inverse of :func:`encode_head` (what the page's script computes): α and force ``[n, n]``."""
    raw = np.frombuffer(zlib.decompress(base64.b64decode(blob)), dtype=np.uint8)
    ca, cf = raw[: n * n].reshape(n, n).astype(np.float64), raw[n * n:].reshape(n, n).astype(np.float64)
    alpha = np.where(ca == 0, 0.0, 10 ** (-ALPHA_DECADES * (255 - ca) / 254))
    pos = fmax * 10 ** (-FORCE_DECADES * (127 - cf) / 126)
    neg = -fmax * 10 ** (-FORCE_DECADES * (cf - 128) / 126)
    force = np.where(cf == 0, 0.0, np.where(cf <= 127, pos, np.where(cf == 255, np.nan, neg)))
    return alpha, force
