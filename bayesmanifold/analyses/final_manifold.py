"""The value manifold as the authors' wind-tunnel scripts measure it, and how much of it is position.

Paper I (arXiv 2512.22471) reports that final-layer representations lie on a nearly one-dimensional
manifold ordered by the posterior entropy (PC1 84–90%). The script the authors' reproduction guide
maps to that figure (``experiments/paper1_bijection/figures/geometric_analysis.py`` in
vishalmisra/bayesian-wind-tunnel) takes the **final residual stream after the final norm**, pools
the rows of every value position (odd indices) of 50 × 64 sequences, runs an **unstandardised**
PCA (scikit-learn) and correlates the PCs (Pearson) with the Bayes entropy log2(V − |seen|).
``qkv_analysis.py value-manifold`` does the same at the last position of each prefix.

Without replacement the Bayes entropy at a position is a function of the position alone, so a
pooled PC1 that tracks entropy may only be tracking position. :class:`FinalResidualAccumulator`
therefore also reports a **position control**:

- ``position_share``: the share of the total variance carried by the per-position means
  (between-position sum of squares / total sum of squares);
- ``pc1_position_r2``: the same ratio for the PC1 scores alone (η² of PC1 on position): how much
  of PC1 is position;
- ``within_pc1_share``: PC1's share after subtracting each position's mean (the within-position
  PCA): the manifold that is left once position is removed;
- ``within_pearson_pc1``: the partial correlation of PC1 with entropy given position (both centred
  within position); ``None`` when the entropy does not vary within a position (without replacement).

The rows come from capture (site ``final``: the model-access layer's hook on the final norm's
output), at the batch's scored positions, with the labels ``bayes_entropy`` and ``position``.
"""

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..errors import InputError
from ..hooks.bundle import LayerBundle, OutputBundle
from .stats import pearson, spearman

__all__ = ["FinalResidualAccumulator", "FinalManifoldResult", "final_manifold_stats"]


@dataclass(frozen=True, eq=False)
class FinalManifoldResult:
    """Unstandardised PCA of the final-norm residual stream, with the position control.

    Attributes:
        pc1_share, pc12_share: λ₁/Σλ and (λ₁+λ₂)/Σλ of the pooled rows.
        explained_variance_ratio: the first (up to 10) shares, as the authors' script prints.
        pearson_pcs: Pearson r of PC1..PC5 with the Bayes entropy; ``best_pc`` the PC with the
            largest |r| (1-based) and ``best_pearson`` that r (the authors' "strongest entropy signal").
        spearman_pc1: Spearman ρ of PC1 with the entropy.
        position_share, pc1_position_r2, within_pc1_share, within_pearson_pc1: the position
            control (module docstring).
        n_samples, n_features, n_positions: rows, width, distinct positions.
        positions: which positions were pooled (a label).
    """

    pc1_share: float
    pc12_share: float
    explained_variance_ratio: np.ndarray
    pearson_pcs: np.ndarray
    best_pc: int
    best_pearson: float
    spearman_pc1: float
    position_share: float
    pc1_position_r2: float
    within_pc1_share: float
    within_pearson_pc1: float | None
    n_samples: int
    n_features: int
    n_positions: int
    positions: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {
            "positions": self.positions,
            "pc1_share": self.pc1_share,
            "pc12_share": self.pc12_share,
            "explained_variance_ratio": [float(x) for x in self.explained_variance_ratio],
            "pearson_pcs": [float(x) for x in self.pearson_pcs],
            "best_pc": self.best_pc,
            "best_pearson": self.best_pearson,
            "spearman_pc1": self.spearman_pc1,
            "position_share": self.position_share,
            "pc1_position_r2": self.pc1_position_r2,
            "within_pc1_share": self.within_pc1_share,
            "within_pearson_pc1": self.within_pearson_pc1,
            "n_samples": self.n_samples,
            "n_features": self.n_features,
            "n_positions": self.n_positions,
        }

    def to_dataframe(self):
        """One row per principal component: pooled share, cumulative share, Pearson r with entropy."""
        import pandas as pd

        ratio = self.explained_variance_ratio
        r = np.full(len(ratio), np.nan)
        r[: len(self.pearson_pcs)] = self.pearson_pcs
        return pd.DataFrame({"component": np.arange(1, len(ratio) + 1), "share": ratio,
                             "cumulative_share": np.cumsum(ratio), "pearson_entropy": r})

    def plot(self, ax=None):
        """Pooled spectrum beside PC1's share with position removed."""
        import matplotlib.pyplot as plt

        if ax is None:
            _, ax = plt.subplots(figsize=(5, 3.2))
        k = len(self.explained_variance_ratio)
        ax.bar(np.arange(1, k + 1), self.explained_variance_ratio, label="pooled (authors' protocol)")
        ax.axhline(self.within_pc1_share, color="C1", ls="--", label=f"PC1 within position {100 * self.within_pc1_share:.0f}%")
        ax.set_xlabel("component")
        ax.set_ylabel("share of variance")
        ax.set_title(f"final-norm residual, {self.positions}: position carries {100 * self.position_share:.0f}% "
                     f"of the variance, {100 * self.pc1_position_r2:.0f}% of PC1", fontsize=8)
        ax.legend(fontsize=7)
        return ax


def _top_eig(cov: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    lam, vec = np.linalg.eigh((cov + cov.T) / 2)
    order = np.argsort(lam)[::-1]
    return np.clip(lam[order], 0.0, None), vec[:, order]


def _between_share(x: np.ndarray, groups: np.ndarray) -> float:
    """Between-group sum of squares over the total sum of squares of ``x`` ([n] or [n, d])."""
    x = x.reshape(len(x), -1)
    mu = x.mean(0)
    total = float(((x - mu) ** 2).sum())
    if total <= 0:
        return float("nan")
    between = 0.0
    for g in np.unique(groups):
        sel = groups == g
        between += float(sel.sum() * ((x[sel].mean(0) - mu) ** 2).sum())
    return between / total


def _centre_within(x: np.ndarray, groups: np.ndarray) -> np.ndarray:
    out = np.array(x, dtype=np.float64, copy=True)
    for g in np.unique(groups):
        sel = groups == g
        out[sel] -= out[sel].mean(0)
    return out


def final_manifold_stats(X: np.ndarray, entropy: np.ndarray, position: np.ndarray, label: str = "") -> FinalManifoldResult:
    """The authors' pooled PCA of ``X`` ([n, d], unstandardised) and the position control.

    Args:
        X: the rows (e.g. final-norm residuals at the pooled positions).
        entropy: [n] Bayes entropy of each row (bits).
        position: [n] the position of each row (any hashable integers).
    """
    X = np.asarray(X, dtype=np.float64)
    h = np.asarray(entropy, dtype=np.float64).reshape(-1)
    pos = np.asarray(position).reshape(-1)
    if X.ndim != 2 or X.shape[0] != h.shape[0] or X.shape[0] != pos.shape[0]:
        raise InputError(f"X must be [n, d] with n entropies and positions; got {X.shape}, {h.shape}, {pos.shape}")
    if X.shape[0] < 3:
        raise InputError(f"the manifold needs at least 3 rows; got {X.shape[0]}")
    Xc = X - X.mean(0)
    lam, vec = _top_eig(Xc.T @ Xc / (len(X) - 1))
    total = lam.sum()
    if total <= 0:
        raise InputError("the rows have no variance")
    ratio = lam / total
    scores = Xc @ vec[:, :5]
    r = np.array([pearson(scores[:, i], h) for i in range(scores.shape[1])], dtype=np.float64)
    finite = np.where(np.isfinite(r), np.abs(r), -1.0)
    best = int(np.argmax(finite))
    W = _centre_within(X, pos)
    lam_w, _ = _top_eig(W.T @ W / max(len(X) - 1, 1))
    within = None
    h_w = _centre_within(h[:, None], pos)[:, 0]
    if np.ptp(h_w) > 1e-12:
        within = float(pearson(_centre_within(scores[:, :1], pos)[:, 0], h_w))
    return FinalManifoldResult(
        pc1_share=float(ratio[0]),
        pc12_share=float(ratio[: 2].sum()),
        explained_variance_ratio=ratio[:10],
        pearson_pcs=r,
        best_pc=best + 1,
        best_pearson=float(r[best]),
        spearman_pc1=float(spearman(scores[:, 0], h)),
        position_share=_between_share(X, pos),
        pc1_position_r2=_between_share(scores[:, 0], pos),
        within_pc1_share=float(lam_w[0] / lam_w.sum()) if lam_w.sum() > 0 else float("nan"),
        within_pearson_pc1=within,
        n_samples=int(X.shape[0]),
        n_features=int(X.shape[1]),
        n_positions=int(len(np.unique(pos))),
        positions=label,
    )


class FinalResidualAccumulator:
    """Capture accumulator: rows of the final-norm residual stream at the scored positions.

    Reads ``out.acts["final"]`` (``[batch, pos, d_model]``) once per pass, with the per-position
    labels ``entropy_label`` and ``position_label`` of the batch. Forward-only, mergeable.

    Example:
        >>> acc = FinalResidualAccumulator(label="value positions")  # doctest: +SKIP
        >>> with capture(model, accumulators=[acc], gradients=False) as cap:  # doctest: +SKIP
        ...     cap.run(Batch(tokens=toks, positions=mask, labels={"bayes_entropy": h, "position": p}))
        >>> acc.finalize().pc1_share  # doctest: +SKIP
    """

    needs_gradients = False
    sites = ("final",)

    def __init__(self, *, label: str = "", entropy_label: str = "bayes_entropy", position_label: str = "position") -> None:
        self.label, self.entropy_label, self.position_label = label, entropy_label, position_label
        self.rows: list[torch.Tensor] = []
        self.entropy: list[torch.Tensor] = []
        self.position: list[torch.Tensor] = []

    def update(self, bundle: LayerBundle) -> None:  # the rows come from the output bundle
        return None

    def update_output(self, out: OutputBundle) -> None:
        if "final" not in out.acts:
            raise InputError("the capture delivered no 'final' site (the final norm's output)")
        mask = out.batch.scored
        x = out.acts["final"].detach().to("cpu", torch.float32)
        if tuple(x.shape[:2]) != tuple(mask.shape):
            raise InputError(f"final residual {tuple(x.shape)} does not match the batch's positions {tuple(mask.shape)}")
        self.rows.append(x[mask])
        self.entropy.append(out.batch.label(self.entropy_label).detach().to("cpu", torch.float64)[mask])
        self.position.append(out.batch.label(self.position_label).detach().to("cpu")[mask])

    def merge(self, other: "FinalResidualAccumulator") -> "FinalResidualAccumulator":
        self.rows += other.rows
        self.entropy += other.entropy
        self.position += other.position
        return self

    def finalize(self) -> FinalManifoldResult:
        if not self.rows:
            raise InputError("no rows were collected: run a batch through capture first")
        return final_manifold_stats(torch.cat(self.rows).numpy(), torch.cat(self.entropy).numpy(),
                                    torch.cat(self.position).numpy(), self.label)
