"""Value manifolds: how many directions the representations at the prediction positions use.

Paper I (arXiv 2512.22471, "Bayesian wind tunnels") reports that the final-layer representations
at each prefix's last position lie on a nearly one-dimensional manifold whose first principal
component tracks the Bayesian posterior entropy (PC1 84–90% of the variance, PC1+PC2 88–95%).
Paper III (arXiv 2512.23752) measures the same in pretrained LLMs on *standardised, concatenated
per-head values* at the final token: PC1, PC1+PC2 and the participation ratio (Σλ)²/Σλ².

This module provides

- :class:`ManifoldAccumulator`: a mergeable streaming PCA (sums of x and xxᵀ in float64, so
  merged partial results equal the one-pass result up to floating-point summation order), with
  optional per-coordinate standardisation;
- :func:`collect_features`: pulls the features from a TransformerLens model with scoped forward
  hooks: per-head values (``hook_v``), concatenated values, head outputs (``hook_z``) or the
  residual stream; the result records which one was used;
- :func:`value_manifold`: both together over a stream of batches.

Constant features under standardisation: they carry no variance, and dividing by a zero standard
deviation is undefined, so they are **dropped** (their number is reported in
``ManifoldResult.n_dropped_constant``). If every feature is constant an :class:`InputError` is
raised. A feature counts as constant when its variance is ≤ ``1e-12 ×`` the largest feature
variance (or exactly 0).
"""

import contextlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from ..errors import InputError, SelectionError

__all__ = [
    "ManifoldAccumulator",
    "ManifoldResult",
    "collect_features",
    "value_manifold",
    "FeatureKind",
]

FeatureKind = Literal["values", "values_concat", "head_outputs", "residual"]
Positions = int | str | Sequence[int] | Tensor | None

# Above this many features the d×d covariance is not accumulated; the kept samples are
# decomposed with scikit-learn's PCA instead (same spectrum, n×d memory).
MAX_COV_FEATURES = 4096


# ---------------------------------------------------------------------------------------------
# small shared helpers (used by the other analyses modules too)


def _hook_model_check(model: Any) -> None:
    if not hasattr(model, "cfg") or not hasattr(model, "hooks") or not hasattr(model, "blocks"):
        from ..errors import ModelError

        raise ModelError(
            f"expected a transformer_lens HookedTransformer (with .cfg, .blocks and .hooks()), "
            f"got {type(model).__name__}"
        )


def _n_kv_heads(model: Any) -> int:
    n_kv = getattr(model.cfg, "n_key_value_heads", None)
    return int(n_kv) if n_kv else int(model.cfg.n_heads)


def _kv_of_head(model: Any, head: int) -> int:
    """The key/value head used by query head ``head`` (GQA: h // (n_heads // n_kv))."""
    return head // (model.cfg.n_heads // _n_kv_heads(model))


def _norm_layer(model: Any, layer: int) -> int:
    n = model.cfg.n_layers
    if not -n <= int(layer) < n:
        raise SelectionError(f"layer {layer} out of range: the model has {n} layers (0..{n - 1} or negative)")
    return int(layer) % n


def _norm_layers(model: Any, layers: Iterable[int] | int | None) -> list[int]:
    if layers is None:
        return list(range(model.cfg.n_layers))
    if isinstance(layers, int):
        layers = [layers]
    out = [_norm_layer(model, x) for x in layers]
    if not out:
        raise SelectionError("layers is empty; give at least one layer or None for all")
    return out


def _norm_heads(model: Any, heads: Iterable[int] | int | None, n: int | None = None) -> list[int]:
    n = int(model.cfg.n_heads) if n is None else n
    if heads is None:
        return list(range(n))
    if isinstance(heads, int):
        heads = [heads]
    out = []
    for h in heads:
        if not -n <= int(h) < n:
            raise SelectionError(f"head {h} out of range: the layer has {n} heads")
        out.append(int(h) % n)
    return out


def _as_tokens(model: Any, tokens: Any) -> Tensor:
    if isinstance(tokens, str) or (isinstance(tokens, list) and tokens and isinstance(tokens[0], str)):
        if getattr(model, "tokenizer", None) is None:
            raise InputError("got text but the model has no tokenizer; pass token ids Int[batch, pos]")
        tokens = model.to_tokens(tokens, truncate=False)  # TL would truncate to n_ctx silently
    t = torch.as_tensor(tokens)
    if t.dim() == 1:
        t = t.unsqueeze(0)
    if t.dim() != 2 or t.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
        raise InputError(f"tokens must be an integer tensor [batch, pos], got dtype {t.dtype} shape {tuple(t.shape)}")
    if t.shape[1] > model.cfg.n_ctx:
        raise InputError(f"tokens have {t.shape[1]} positions but the model's context is n_ctx={model.cfg.n_ctx}")
    if t.numel() and (int(t.min()) < 0 or int(t.max()) >= model.cfg.d_vocab):
        raise InputError(f"token ids must lie in 0..{model.cfg.d_vocab - 1}, got {int(t.min())}..{int(t.max())}")
    return t.long()


def _position_mask(
    positions: Positions,
    batch: int,
    n_pos: int,
    attention_mask: Tensor | None = None,
) -> Bool[Tensor, "batch pos"]:
    """Turn a position selection into a boolean mask [batch, pos].

    Accepted: ``None`` or ``"all"`` (every valid position), ``"last"`` (the last valid position of
    each row; with an attention mask, the last non-padded one), an int (negative counts from the
    end), a list of ints, an Int[batch] tensor (one position per row) or a Bool[batch, pos] mask.
    """
    valid = torch.ones(batch, n_pos, dtype=torch.bool)
    if attention_mask is not None:
        valid = attention_mask.detach().to("cpu").bool()
    if positions is None or (isinstance(positions, str) and positions == "all"):
        return valid
    if isinstance(positions, str):
        if positions != "last":
            raise InputError(f"positions {positions!r} not understood: use 'last', 'all', an int, a list, an Int[batch] or Bool[batch, pos] tensor")
        out = torch.zeros(batch, n_pos, dtype=torch.bool)
        # last valid position (works for left or right padding)
        idx = torch.arange(n_pos).expand(batch, n_pos)
        last = torch.where(valid, idx, torch.full_like(idx, -1)).max(dim=1).values
        if (last < 0).any():
            raise InputError("a row has no valid position (attention_mask all zero)")
        out[torch.arange(batch), last] = True
        return out
    if isinstance(positions, Tensor) and positions.dtype == torch.bool:
        if tuple(positions.shape) != (batch, n_pos):
            raise InputError(f"boolean positions mask must have shape (batch, pos)=({batch}, {n_pos}), got {tuple(positions.shape)}")
        return positions.detach().to("cpu") & valid
    if isinstance(positions, Tensor) and positions.dim() == 1 and positions.shape[0] == batch and batch > 1:
        pos = positions.detach().to("cpu").long()
        if ((pos < -n_pos) | (pos >= n_pos)).any():
            raise InputError(f"per-row positions must lie in -{n_pos}..{n_pos - 1}")
        out = torch.zeros(batch, n_pos, dtype=torch.bool)
        out[torch.arange(batch), pos % n_pos] = True
        return out & valid
    if isinstance(positions, int | np.integer):
        positions = [int(positions)]
    pos_list = [int(p) for p in torch.as_tensor(positions).reshape(-1).tolist()]
    out = torch.zeros(batch, n_pos, dtype=torch.bool)
    for p in pos_list:
        if not -n_pos <= p < n_pos:
            raise InputError(f"position {p} out of range for sequences of length {n_pos}")
        out[:, p % n_pos] = True
    return out & valid


@contextlib.contextmanager
def _scoped_hooks(model: Any, fwd_hooks: list[tuple[str, Callable]]):
    """Add our forward hooks for the duration of the block; only ours are removed afterwards."""
    for name, _ in fwd_hooks:
        if name not in model.hook_dict:
            raise SelectionError(f"the model has no hook point {name!r}")
    # TL removes only the hooks of this context level on exit; clear_contexts=False leaves the
    # user's hook contexts (hook.ctx) alone.
    with model.hooks(fwd_hooks=fwd_hooks, clear_contexts=False):
        yield


def _forward_capture(
    model: Any,
    tokens: Tensor,
    names: Sequence[str],
    attention_mask: Tensor | None = None,
    return_logits: bool = False,
) -> tuple[dict[str, Tensor], Tensor | None]:
    """One no-grad forward that stores detached activations at ``names``."""
    store: dict[str, Tensor] = {}

    def hook(act: Tensor, hook: Any) -> None:
        store[hook.name] = act.detach()

    device = model.cfg.device
    toks = tokens.to(device)
    kwargs: dict[str, Any] = {}
    if attention_mask is not None:
        kwargs["attention_mask"] = attention_mask.to(device)
    with torch.no_grad(), _scoped_hooks(model, [(n, hook) for n in names]):
        logits = model(toks, return_type="logits" if return_logits else None, **kwargs)
    return store, (logits.detach() if return_logits else None)


# ---------------------------------------------------------------------------------------------
# results


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
        }

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


# ---------------------------------------------------------------------------------------------
# the accumulator


def _rankdata(x: np.ndarray) -> np.ndarray:
    from scipy.stats import rankdata

    return rankdata(x)


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
    if len(a) < 3 or np.std(a) == 0 or np.std(b) == 0:
        return float("nan")
    ra, rb = _rankdata(a), _rankdata(b)
    return float(np.corrcoef(ra, rb)[0, 1])


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
                rho = _spearman(scores[:, 0], scalar)
                if np.std(scalar) > 0 and np.std(scores[:, 0]) > 0:
                    r2 = float(np.corrcoef(scores[:, 0], scalar)[0, 1] ** 2)
                else:
                    r2 = float("nan")
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
            **stats,
        )


# ---------------------------------------------------------------------------------------------
# collecting features from a model


def _feature_hook(model: Any, kind: str, layer: int) -> str:
    if kind in ("values", "values_concat"):
        return f"blocks.{layer}.attn.hook_v"
    if kind == "head_outputs":
        return f"blocks.{layer}.attn.hook_z"
    if kind == "residual":
        return f"blocks.{layer}.hook_resid_post"
    raise InputError(f"feature kind {kind!r} not known: use 'values', 'values_concat', 'head_outputs' or 'residual'")


def describe_features(model: Any, kind: FeatureKind, layer: int, head: int | None) -> str:
    """A readable label: which representation, layer and head."""
    layer = _norm_layer(model, layer)
    if kind == "values":
        h = 0 if head is None else head
        kv = _kv_of_head(model, h)
        extra = f" (kv head {kv})" if _n_kv_heads(model) != model.cfg.n_heads else ""
        return f"values (hook_v) layer {layer} head {h}{extra}"
    if kind == "values_concat":
        return f"values (hook_v) layer {layer}, {_n_kv_heads(model)} kv heads concatenated"
    if kind == "head_outputs":
        return f"head outputs (hook_z) layer {layer}" + (f" head {head}" if head is not None else ", heads concatenated")
    return f"residual stream (hook_resid_post) layer {layer}"


def collect_features(
    model: Any,
    tokens: Int[Tensor, "batch pos"],
    *,
    kind: FeatureKind = "values_concat",
    layer: int = -1,
    head: int | None = None,
    positions: Positions = "last",
    attention_mask: Int[Tensor, "batch pos"] | None = None,
) -> Float[Tensor, "sample feature"]:
    """Features at the selected positions of one batch, in row-major (batch, pos) order.

    Args:
        model: a HookedTransformer.
        tokens: token ids.
        kind: ``"values"`` (one head's v, GQA: the kv head of ``head``), ``"values_concat"`` (the
            layer's values over its kv heads concatenated; under GQA the n_kv distinct value
            vectors, not the n_heads expanded copies), ``"head_outputs"`` (hook_z, one head or all
            concatenated) or ``"residual"`` (hook_resid_post of ``layer``).
        layer: layer index (negative counts from the end).
        head: query head for ``"values"`` / ``"head_outputs"``.
        positions: see :func:`_position_mask` ("last", "all", int, list, Int[batch], Bool[batch, pos]).
        attention_mask: optional padding mask (1 = real token).

    Returns:
        Float[sample, feature] on CPU (float32).
    """
    _hook_model_check(model)
    layer = _norm_layer(model, layer)
    toks = _as_tokens(model, tokens)
    name = _feature_hook(model, kind, layer)
    if kind == "values":
        head = _norm_heads(model, 0 if head is None else head)[0]
    elif kind == "head_outputs" and head is not None:
        head = _norm_heads(model, head)[0]
    store, _ = _forward_capture(model, toks, [name], attention_mask)
    act = store[name].to("cpu", torch.float32)
    mask = _position_mask(positions, toks.shape[0], toks.shape[1], attention_mask)
    if kind == "values":
        act = act[:, :, _kv_of_head(model, head)]
    elif kind == "head_outputs" and head is not None:
        act = act[:, :, head]
    elif act.dim() == 4:
        act = act.flatten(2)
    return act[mask]


def value_manifold(
    model: Any,
    batches: Iterable[Any],
    *,
    kind: FeatureKind = "values_concat",
    layer: int = -1,
    head: int | None = None,
    positions: Positions = "last",
    standardize: bool = True,
    scalar_fn: Callable[[Tensor, Tensor], Tensor] | None = None,
    scalar_name: str = "scalar",
) -> ManifoldResult:
    """Stream batches through the model, collect features and run the PCA.

    Args:
        batches: an iterable of token tensors, of ``(tokens, scalar)`` pairs where ``scalar`` is
            one number per selected position (row-major order), or of
            ``(tokens, scalar, positions)`` triples with per-batch positions.
        scalar_fn: alternatively ``scalar_fn(tokens, mask) -> Float[n]`` giving the scalar for the
            selected positions (mask is the Bool[batch, pos] selection).
        Other args: as in :func:`collect_features`.

    Example:
        >>> res = value_manifold(model, [toks], kind="residual", positions="last")  # doctest: +SKIP
    """
    acc = ManifoldAccumulator(
        standardize=standardize, feature_kind=describe_features(model, kind, layer, head), scalar_name=scalar_name
    )
    for item in batches:
        pos = positions
        scalar = None
        if isinstance(item, tuple | list) and not isinstance(item, Tensor):
            toks = item[0]
            scalar = item[1] if len(item) > 1 else None
            if len(item) > 2:
                pos = item[2]
        else:
            toks = item
        toks = _as_tokens(model, toks)
        feats = collect_features(model, toks, kind=kind, layer=layer, head=head, positions=pos)
        if scalar is None and scalar_fn is not None:
            scalar = scalar_fn(toks, _position_mask(pos, toks.shape[0], toks.shape[1]))
        acc.update(feats, scalar)
    return acc.finalize()
