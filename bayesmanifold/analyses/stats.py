"""Statistics shared by every measurement, each defined once with one NaN policy.

NaN policy: a correlation that is undefined (fewer than 2 samples for Pearson, 3 for Spearman, or
a constant side) is ``nan``, never 0: a caller that wants a number decides what an undefined
correlation means, and says so. Entropies are in nats with 0·log 0 = 0.
"""

from collections.abc import Sequence

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor

__all__ = ["pearson", "spearman", "entropy", "js_divergence", "stabilization_step", "settling_step"]


def _np(x: Tensor | np.ndarray | Sequence[float]) -> np.ndarray:
    if isinstance(x, Tensor):
        return x.detach().to("cpu", torch.float64).reshape(-1).numpy()
    return np.asarray(x, dtype=np.float64).reshape(-1)


def pearson(a: Tensor | np.ndarray, b: Tensor | np.ndarray) -> float:
    """Pearson correlation in float64; nan with fewer than 2 samples or a constant side."""
    x, y = _np(a), _np(b)
    if x.size < 2:
        return float("nan")
    x, y = x - x.mean(), y - y.mean()
    den = float(np.linalg.norm(x) * np.linalg.norm(y))
    return float(x @ y) / den if den > 0 else float("nan")


def spearman(a: Tensor | np.ndarray, b: Tensor | np.ndarray) -> float:
    """Spearman rank correlation (average ranks for ties); nan with fewer than 3 samples or a constant side."""
    from scipy.stats import rankdata

    x, y = _np(a), _np(b)
    if x.size < 3 or np.std(x) == 0 or np.std(y) == 0:
        return float("nan")
    return pearson(rankdata(x), rankdata(y))


def entropy(p: Float[Tensor, "... n"]) -> Float[Tensor, "..."]:
    """Shannon entropy (nats) of distributions along the last dim, float64; uniform over n gives ln n."""
    # entr(x) = -x·log x for x > 0 and 0 at x = 0: one fused pass, no temporaries for the mask.
    return torch.special.entr(p.to(torch.float64)).sum(-1)


def js_divergence(p: Tensor, q: Tensor) -> Tensor:
    """Jensen–Shannon divergence (nats) between distributions along the last dim; in [0, ln 2]."""
    p, q = p.double(), q.double()
    m = 0.5 * (p + q)

    def kl(a: Tensor, b: Tensor) -> Tensor:
        return torch.where(a > 0, a * (torch.log(a.clamp_min(1e-300)) - torch.log(b.clamp_min(1e-300))), torch.zeros_like(a)).sum(-1)

    return 0.5 * kl(p, m) + 0.5 * kl(q, m)


def stabilization_step(
    steps: Sequence[int], series: Sequence[float], *, fraction: float = 0.1, early_window: int | None = None, min_stable: int = 2
) -> int | None:
    """First step from which ``series`` stays below ``fraction`` × its early level (see module doc).

    The early level is the series' peak (``early_window=None``) or the maximum of its first
    ``early_window`` values. NaN entries (e.g. the first checkpoint, which has no predecessor) are
    skipped. Returns None if the series never stabilises, if the stable stretch at the end has
    fewer than ``min_stable`` checkpoints (a last point alone is no evidence: right-censored), or
    if there are fewer than 2 finite values (or fewer than ``early_window + 1``).
    """
    s = np.asarray(series, dtype=float)
    st = np.asarray(steps)
    ok = np.isfinite(s)
    s, st = s[ok], st[ok]
    if len(s) < (2 if early_window is None else early_window + 1):
        return None
    early = float(np.max(s if early_window is None else s[:early_window]))
    if early <= 0:
        return int(st[0])
    below = s < fraction * early
    # suffix-all: stable from index i if all below[i:]
    stable_from = None
    for i in range(len(s) - 1, -1, -1):
        if below[i]:
            stable_from = i
        else:
            break
    if stable_from is None or len(s) - stable_from < min_stable:
        return None
    return int(st[stable_from])


def settling_step(steps: Sequence[int], distance: Sequence[float], *, tol: float = 0.1, min_stable: int = 2) -> int | None:
    """First step from which a distance-to-final series stays ≤ ``tol`` × its maximum.

    The last checkpoint (distance 0 by construction) is left out; the stable stretch before it
    must hold at least ``min_stable`` checkpoints. NaNs are skipped.
    """
    d = np.asarray(distance, dtype=float)[:-1]
    st = np.asarray(steps)[:-1]
    ok = np.isfinite(d)
    d, st = d[ok], st[ok]
    if len(d) < min_stable + 1 or np.max(d) <= 0:
        return None
    below = d <= tol * np.max(d)
    i = len(d)
    while i > 0 and below[i - 1]:
        i -= 1
    return None if len(d) - i < min_stable else int(st[i])
