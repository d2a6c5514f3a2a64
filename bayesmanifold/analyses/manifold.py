"""Value manifolds: how many directions a set of representations uses (a streaming PCA).

Paper I (arXiv 2512.22471, "Bayesian wind tunnels") reports that the final-layer representations
at each prefix's last position lie on a nearly one-dimensional manifold whose first principal
component tracks the Bayesian posterior entropy (PC1 84–90% of the variance, PC1+PC2 88–95%).
Paper III (arXiv 2512.23752) measures the same in pretrained LLMs on *standardised, concatenated
per-head values* at the final token: PC1, PC1+PC2 and the participation ratio (Σλ)²/Σλ².

This module holds the PCA only: :class:`ManifoldAccumulator`, a mergeable streaming PCA (sums of
x and xxᵀ in float64, so merged partial results equal the one-pass result up to floating-point
summation order) with optional per-coordinate standardisation, and its :class:`ManifoldResult`.
Which representation is fed to it (values, head outputs, the residual stream) is the business of
:mod:`bayesmanifold.analyses.features`.

Constant features under standardisation: they carry no variance, and dividing by a zero standard
deviation is undefined, so they are **dropped** (their number is reported in
``ManifoldResult.n_dropped_constant``). If every feature is constant an :class:`InputError` is
raised. A feature counts as constant when its variance is ≤ ``1e-12 ×`` the largest feature
variance (or exactly 0).

Fewer samples than features: n samples span at most n − 1 directions, so with n ≤ d the
covariance is rank-limited and the leading shares are inflated (two samples always give
PC1 = 100%). :meth:`ManifoldAccumulator.finalize` then warns, naming the counts, and the result
records ``rank_limited=True``.
"""

import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor

from ..errors import InputError
from .stats import pearson, spearman

__all__ = ["ManifoldAccumulator", "ManifoldResult", "RankLimitedWarning", "spectrum_stats", "MAX_COV_FEATURES"]

# Above this many features the d×d covariance is not accumulated; the kept samples are
# decomposed with scikit-learn's PCA instead (same spectrum, n×d memory).
MAX_COV_FEATURES = 4096


class RankLimitedWarning(UserWarning):
    """A PCA with no more samples than features: its covariance is rank-limited, its shares inflated."""


def _json_float(x: float | None) -> float | None:
    return None if x is None else float(x)


@dataclass(frozen=True, eq=False)
class ManifoldResult:
    """PCA of a set of representations, and how its first axis tracks a per-sample scalar.

    Attributes:
        explained_variance: eigenvalues λ (descending) of the (standardised) covariance.
        explained_variance_ratio: λ / Σλ.
        pc1_share: λ₁/Σλ. pc12_share: (λ₁+λ₂)/Σλ.
        participation_ratio: (Σλ)²/Σλ² (1 for a line, d for an isotropic cloud).
        n_components_90, n_components_95: smallest k with cumulative share ≥ 0.90 / 0.95.
        scores: PC1, PC2 coordinates of each kept sample [n, 2] (None if samples were not kept).
        scalar: the per-sample scalar (e.g. Bayes entropy), or None.
        spearman_pc1: Spearman ρ between PC1 score and the scalar (sign is arbitrary, as PC1's).
        r2_pc1: R² of a linear fit scalar ~ PC1 (= Pearson r²).
        feature_kind: which representation ("values layer 5 head 2", "residual layer 5", ...).
        rank_limited: fewer samples than features plus one (n ≤ d): the covariance has rank at
            most n − 1 < d and the leading shares are inflated (see the module docstring).
    """

    explained_variance: np.ndarray
    explained_variance_ratio: np.ndarray
    pc1_share: float
    pc12_share: float
    participation_ratio: float
    n_components_90: int
    n_components_95: int
    n_samples: int
    n_features: int
    n_dropped_constant: int
    standardized: bool
    scores: np.ndarray | None = None
    scalar: np.ndarray | None = None
    spearman_pc1: float | None = None
    r2_pc1: float | None = None
    feature_kind: str = ""
    scalar_name: str = "scalar"
    rank_limited: bool = False

    def summary(self) -> dict[str, Any]:
        """The headline numbers as a flat JSON-able dict."""
        return {
            "feature_kind": self.feature_kind,
            "n_samples": self.n_samples,
            "n_features": self.n_features,
            "n_dropped_constant": self.n_dropped_constant,
            "standardized": self.standardized,
            "pc1_share": self.pc1_share,
            "pc12_share": self.pc12_share,
            "participation_ratio": self.participation_ratio,
            "n_components_90": self.n_components_90,
            "n_components_95": self.n_components_95,
            "spearman_pc1": self.spearman_pc1,
            "r2_pc1": self.r2_pc1,
            "rank_limited": self.rank_limited,
        }

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe: the headline numbers, the scalar's name and the spectrum (not the per-sample scores)."""
        d = self.summary()
        d.update(
            spearman_pc1=_json_float(self.spearman_pc1),
            r2_pc1=_json_float(self.r2_pc1),
            scalar_name=self.scalar_name,
            explained_variance=[float(x) for x in self.explained_variance],
            explained_variance_ratio=[float(x) for x in self.explained_variance_ratio],
        )
        return d

    def to_dataframe(self):
        """One row per principal component: eigenvalue, share, cumulative share."""
        import pandas as pd

        ratio = self.explained_variance_ratio
        return pd.DataFrame(
            {
                "component": np.arange(1, len(ratio) + 1),
                "eigenvalue": self.explained_variance,
                "share": ratio,
                "cumulative_share": np.cumsum(ratio),
                "feature_kind": self.feature_kind,
            }
        )

    def plot(self, ax=None):
        """Scatter of PC1 vs PC2 coloured by the scalar (or the spectrum if no samples were kept)."""
        import matplotlib.pyplot as plt

        if ax is None:
            _, ax = plt.subplots(figsize=(5, 4))
        if self.scores is None:
            k = min(20, len(self.explained_variance_ratio))
            ax.bar(np.arange(1, k + 1), self.explained_variance_ratio[:k])
            ax.set_xlabel("component")
            ax.set_ylabel("share of variance")
        else:
            c = self.scalar if self.scalar is not None else None
            sc = ax.scatter(self.scores[:, 0], self.scores[:, 1], c=c, s=8, cmap="viridis")
            if c is not None:
                ax.figure.colorbar(sc, ax=ax, label=self.scalar_name)
            ax.set_xlabel(f"PC1 ({100 * self.pc1_share:.1f}%)")
            ax.set_ylabel(f"PC2 ({100 * (self.pc12_share - self.pc1_share):.1f}%)")
        title = self.feature_kind or "manifold"
        if self.spearman_pc1 is not None:
            title += f"  ρ(PC1, {self.scalar_name}) = {self.spearman_pc1:+.2f}"
        ax.set_title(title, fontsize=9)
        return ax


def spectrum_stats(eigenvalues: np.ndarray) -> dict[str, float | int]:
    """PC1, PC1+PC2 shares, participation ratio and components for 90/95% from eigenvalues."""
    lam = np.clip(np.sort(np.asarray(eigenvalues, dtype=np.float64))[::-1], 0.0, None)
    total = lam.sum()
    if total <= 0:
        raise InputError("all eigenvalues are zero: the features have no variance")
    ratio = lam / total
    cum = np.cumsum(ratio)
    return {
        "pc1_share": float(ratio[0]),
        "pc12_share": float(cum[min(1, len(cum) - 1)]),
        "participation_ratio": float(total**2 / np.sum(lam**2)),
        "n_components_90": int(np.searchsorted(cum, 0.90 - 1e-12) + 1),
        "n_components_95": int(np.searchsorted(cum, 0.95 - 1e-12) + 1),
    }


class ManifoldAccumulator:
    """Streaming, mergeable PCA of feature vectors with an optional per-sample scalar.

    Keeps n, Σx, Σx² and (for ≤ ``MAX_COV_FEATURES`` features) Σxxᵀ in float64; with
    ``keep_samples=True`` (default) also the samples themselves (float32, CPU), needed for the PC
    scores, the Spearman correlation and the scatter plot.

    Args:
        standardize: z-score every coordinate before PCA (Paper III); constant coordinates are
            dropped and counted.
        keep_samples: keep the samples for scores / Spearman / scatter.
        feature_kind: a label stored in the result (which representation this is).
        scalar_name: label of the per-sample scalar.
        n_components: keep only this many eigenvalues in the result (shares stay relative to the
            total variance); finalize raises InputError if there are fewer samples than this.

    Example:
        >>> acc = ManifoldAccumulator(standardize=False)
        >>> acc.update(torch.randn(100, 8), scalar=torch.rand(100))
        >>> res = acc.finalize(); 0 < res.pc1_share <= 1
        True
    """

    def __init__(
        self,
        *,
        standardize: bool = True,
        keep_samples: bool = True,
        feature_kind: str = "",
        scalar_name: str = "scalar",
        n_components: int | None = None,
    ) -> None:
        if n_components is not None and int(n_components) < 1:
            raise InputError(f"n_components must be ≥ 1 or None, got {n_components}")
        self.n_components = None if n_components is None else int(n_components)
        self.standardize = standardize
        self.keep_samples = keep_samples
        self.feature_kind = feature_kind
        self.scalar_name = scalar_name
        self.n = 0
        self.d: int | None = None
        self.sum: np.ndarray | None = None
        self.sumsq: np.ndarray | None = None
        self.outer: np.ndarray | None = None
        self.samples: list[np.ndarray] = []
        self.scalars: list[np.ndarray] = []
        self._has_scalar: bool | None = None

    def update(
        self,
        features: Float[Tensor, "sample feature"] | np.ndarray,
        scalar: Float[Tensor, " sample"] | np.ndarray | None = None,
    ) -> None:
        """Add samples (rows) and, optionally, their scalars."""
        x = features.detach().to("cpu", torch.float64).numpy() if isinstance(features, Tensor) else np.asarray(features, dtype=np.float64)
        if x.ndim != 2:
            raise InputError(f"features must be 2-D [sample, feature], got shape {x.shape}")
        if self.d is None:
            self.d = x.shape[1]
            self.sum = np.zeros(self.d)
            self.sumsq = np.zeros(self.d)
            if self.d <= MAX_COV_FEATURES:
                self.outer = np.zeros((self.d, self.d))
        elif x.shape[1] != self.d:
            raise InputError(f"features have {x.shape[1]} columns, earlier batches had {self.d}")
        if not np.all(np.isfinite(x)):
            raise InputError("features contain NaN or inf")
        has = scalar is not None
        if self._has_scalar is None:
            self._has_scalar = has
        elif self._has_scalar != has:
            raise InputError("give a scalar with every batch or with none")
        if has:
            s = scalar.detach().to("cpu", torch.float64).numpy() if isinstance(scalar, Tensor) else np.asarray(scalar, dtype=np.float64)
            s = s.reshape(-1)
            if s.shape[0] != x.shape[0]:
                raise InputError(f"scalar has {s.shape[0]} entries but features have {x.shape[0]} samples")
            self.scalars.append(s)
        self.n += x.shape[0]
        self.sum += x.sum(0)
        self.sumsq += (x * x).sum(0)
        if self.outer is not None:
            self.outer += x.T @ x
        if self.keep_samples or self.outer is None:
            self.samples.append(x.astype(np.float32))

    def merge(self, other: "ManifoldAccumulator") -> "ManifoldAccumulator":
        """Combine another accumulator's samples into this one (in place; returns self)."""
        if other.d is None:
            return self
        if self.d is None:
            self.d, self.sum, self.sumsq = other.d, other.sum.copy(), other.sumsq.copy()
            self.outer = None if other.outer is None else other.outer.copy()
            self._has_scalar = other._has_scalar
        else:
            if other.d != self.d:
                raise InputError(f"cannot merge accumulators with {self.d} and {other.d} features")
            if self._has_scalar != other._has_scalar and self.n and other.n:
                raise InputError("cannot merge an accumulator with scalars and one without")
            self.sum = self.sum + other.sum
            self.sumsq = self.sumsq + other.sumsq
            if self.outer is not None:
                self.outer = self.outer + other.outer
        self.n += other.n
        self.samples = self.samples + other.samples
        self.scalars = self.scalars + other.scalars
        return self

    def finalize(self) -> ManifoldResult:
        """Eigen-decompose and summarise. Raises InputError with fewer than 2 samples."""
        if self.d is None or self.n < 2:
            raise InputError(f"PCA needs at least 2 samples, got {self.n}")
        if self.n_components is not None and self.n < self.n_components:
            raise InputError(f"fewer samples ({self.n}) than requested components ({self.n_components})")
        n, d = self.n, self.d
        mean = self.sum / n
        var = np.maximum(self.sumsq / n - mean**2, 0.0)
        keep = np.ones(d, dtype=bool)
        if self.standardize:
            tol = 1e-12 * max(float(var.max()), 0.0)
            keep = var > tol
            if not keep.any():
                raise InputError("every feature is constant: nothing to standardise")
        n_drop = int((~keep).sum())
        rank_limited = n <= int(keep.sum())
        if rank_limited:
            warnings.warn(
                f"PCA of {n} samples in {int(keep.sum())} features{' (' + self.feature_kind + ')' if self.feature_kind else ''}: "
                f"the covariance has rank at most {n - 1}, so the leading shares (PC1, PC1+PC2) are inflated; "
                f"at least {int(keep.sum()) + 1} samples (n_features + 1) are needed for a full-rank covariance",
                RankLimitedWarning,
                stacklevel=2,
            )
        std = np.sqrt(var[keep]) if self.standardize else np.ones(int(keep.sum()))
        X = np.concatenate(self.samples, 0)[:, keep].astype(np.float64) if self.samples else None
        if self.outer is not None:
            cov = self.outer[np.ix_(keep, keep)] / n - np.outer(mean[keep], mean[keep])
            cov = cov / np.outer(std, std)
            cov *= n / (n - 1)  # unbiased, as scikit-learn's explained_variance_
            lam, vec = np.linalg.eigh((cov + cov.T) / 2)
            order = np.argsort(lam)[::-1]
            lam, vec = np.clip(lam[order], 0, None), vec[:, order]
            comps = vec[:, :2].T
        else:
            from sklearn.decomposition import PCA

            Z = (X - mean[keep]) / std
            pca = PCA(svd_solver="full").fit(Z)
            lam = np.clip(pca.explained_variance_, 0, None)
            comps = pca.components_[:2]
        stats = spectrum_stats(lam)
        total = lam.sum()
        if self.n_components is not None:
            lam = lam[: self.n_components]
        scores = scalar = rho = r2 = None
        if self.keep_samples and X is not None:
            Z = (X - mean[keep]) / std
            scores = Z @ comps.T
            if scores.shape[1] < 2:
                scores = np.concatenate([scores, np.zeros((scores.shape[0], 1))], 1)
            if self._has_scalar:
                scalar = np.concatenate(self.scalars)
                rho = spearman(scores[:, 0], scalar)
                r2 = pearson(scores[:, 0], scalar) ** 2  # nan when a side is constant
        return ManifoldResult(
            explained_variance=lam,
            explained_variance_ratio=lam / total,
            n_samples=n,
            n_features=int(keep.sum()),
            n_dropped_constant=n_drop,
            standardized=self.standardize,
            scores=scores,
            scalar=scalar,
            spearman_pc1=rho,
            r2_pc1=r2,
            feature_kind=self.feature_kind,
            scalar_name=self.scalar_name,
            rank_limited=rank_limited,
            **stats,
        )

