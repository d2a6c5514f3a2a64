"""Paper III's measurements as the authors' code makes them, for a side-by-side with ours.

The authors' LLM pipeline (vishalmisra/bayesian-wind-tunnel@670c6d6,
``experiments/paper3_llm/sula_pipeline/hf_activations.py`` and ``analyze_icl_sula.py``;
PAPERS.md §7) differs from :mod:`.paper3` (ours) in three places:

- **value manifold**: the final layer only; the final token's per-head values concatenated,
  standardised (scikit-learn's ``StandardScaler``), PCA with 10 components; PC1, PC2 and PC1+PC2
  as shares of the *total* variance (``explained_variance_ratio_``), the participation ratio
  (Σλ)²/Σλ² from those 10 eigenvalues only, Pearson r of the PC1 score with the entropy, and a
  bootstrap over prompts (1,000 resamples, ``default_rng(42)``, PCA with 2 components) for 95%
  intervals of the shares;
- **key orthogonality**: per layer, the mean off-diagonal |cos| between the final-token key
  vectors of the different heads, per prompt, averaged over prompts (ours: the W_K columns);
- **attention entropy**: per head of the final token's row, in bits, averaged over heads then
  prompts: the same statistic as ours (which is in nats), so its reduction is the same number.

Grouped-query attention. Their code reshapes the k/v projection outputs into ``num_attention_heads``
chunks (``hidden_dim // num_heads``), raising when the width does not divide. On Llama-3.2-1B
(8 kv heads × 64 = 512 wide, 32 query heads) that gives 32 "heads" of width 16, quarters of the
real heads; the concatenated values are the same 512 numbers either way (the value manifold is
unchanged), but the key statistic is then over quarter-head chunks (pre-RoPE). On SmolLM2-135M
(3 kv heads × 64 = 192 wide, 9 query heads) 192 / 9 is not an integer: their pipeline stops with
"Hidden dim (192) not divisible by num_heads (9)". Here the keys are the n_kv real key heads
(``key_cos_kv``); ``key_cos_query_heads`` is the same statistic over the n_heads query heads, each
reading its kv head (repeat-kv): pairs inside a group are identical (|cos| = 1), so it equals
(g − 1)/(n_heads − 1) + (1 − (g − 1)/(n_heads − 1)) × the cross-group mean, with g = n_heads / n_kv.
Keys are read after the rotary embedding (the engine's ``k`` site): the same rotation is applied to
every head at a position, so the cosine between two heads' keys at the final token is the same
before and after it.

Everything is read through the capture engine: the accumulators here ride in the same pass as ours
(:func:`bayesmanifold.analyses.paper3.paper3_protocol` with ``protocol="authors"``).
"""

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..hooks.bundle import LayerBundle
from .keys import mean_offdiag_cosine

__all__ = ["AUTHORS_SOURCE", "FinalTokenKeyCosAccumulator", "Paper3AuthorsResult", "authors_value_manifold",
           "authors_gqa_reshape"]

AUTHORS_SOURCE = ("vishalmisra/bayesian-wind-tunnel@670c6d6: experiments/paper3_llm/sula_pipeline/"
                  "hf_activations.py (capture) and analyze_icl_sula.py (statistics)")
_LN2 = float(np.log(2.0))


def authors_gqa_reshape(n_heads: int, n_kv_heads: int, d_head: int) -> str:
    """What the authors' reshaping (k/v projection width // number of query heads) does on this model."""
    width = n_kv_heads * d_head
    if n_kv_heads == n_heads:
        return f"no GQA: {n_heads} heads of width {d_head}, as the model has them"
    if width % n_heads:
        return (f"fails: the k/v projections are {n_kv_heads} × {d_head} = {width} wide and {width} is not divisible by "
                f"the {n_heads} query heads (their code raises 'Hidden dim ({width}) not divisible by num_heads ({n_heads})')")
    return (f"runs with {n_heads} 'heads' of width {width // n_heads} cut from {n_kv_heads} real heads of width {d_head}: "
            "the concatenated values are unchanged, the key statistic is over sub-head chunks")


class FinalTokenKeyCosAccumulator:
    """Mean off-diagonal |cos| between the heads' key vectors at each prompt's scored (final) token.

    Per layer: over the n_kv distinct key heads (``kv``) and over the n_heads query heads each
    reading its kv head (``query_heads``); each prompt's statistic is averaged over prompts.
    """

    needs_gradients = False
    sites = ("k",)

    def __init__(self, layers: list[int], n_heads: int, n_kv_heads: int) -> None:
        self.layers = list(layers)
        self.n_heads, self.n_kv_heads = int(n_heads), int(n_kv_heads)
        self.sum_kv = np.zeros(len(self.layers))
        self.sum_q = np.zeros(len(self.layers))
        self.count = np.zeros(len(self.layers), dtype=np.int64)

    def update(self, bundle: LayerBundle) -> None:
        if bundle.layer not in self.layers:
            return
        i = self.layers.index(bundle.layer)
        k = bundle.acts["k"].to("cpu", torch.float64)  # [batch, pos, n_kv, d_head]
        rows = k[bundle.batch.scored]  # [n, n_kv or n_heads, d_head]
        if rows.shape[0] == 0:
            return
        group = self.n_heads // self.n_kv_heads
        if rows.shape[1] == self.n_heads and group > 1:  # a backend that delivers keys repeated per query head
            rows = rows[:, ::group]
        expanded = rows[:, torch.arange(self.n_heads) // group]  # [n, n_heads, d_head]: head h reads kv head h // group
        if rows.shape[1] > 1:
            self.sum_kv[i] += float(mean_offdiag_cosine(rows, absolute=True).sum())
        else:
            self.sum_kv[i] = np.nan
        self.sum_q[i] += float(mean_offdiag_cosine(expanded, absolute=True).sum())
        self.count[i] += rows.shape[0]

    def merge(self, other: "FinalTokenKeyCosAccumulator") -> "FinalTokenKeyCosAccumulator":
        self.sum_kv += other.sum_kv
        self.sum_q += other.sum_q
        self.count += other.count
        return self

    def finalize(self) -> dict[str, np.ndarray]:
        n = np.maximum(self.count, 1)
        return {"kv": self.sum_kv / n, "query_heads": self.sum_q / n}


def authors_value_manifold(x: np.ndarray, entropy: np.ndarray, *, n_components: int = 10, n_boot: int = 1000,
                           seed: int = 42) -> dict[str, Any]:
    """``analyze_icl_sula.compute_pca_metrics`` on rows ``x`` [prompts, features] and their entropies.

    StandardScaler (zero-variance features left at 0), PCA(n_components), shares of the total
    variance, participation ratio from the kept eigenvalues, Pearson r of PC1/PC2 with
    ``entropy``, and a bootstrap (``n_boot`` resamples of the prompts, ``default_rng(seed)``, PCA
    with 2 components) for 95% intervals. ``n_boot=0`` skips the bootstrap.
    """
    from sklearn.decomposition import PCA

    x = np.asarray(x, dtype=np.float64)
    h = np.asarray(entropy, dtype=np.float64)
    sd = x.std(0)
    z = (x - x.mean(0)) / np.where(sd > 0, sd, 1.0)
    k = min(n_components, *z.shape)
    pca = PCA(n_components=k, svd_solver="full")
    coords = pca.fit_transform(z)
    ev, ratio = pca.explained_variance_, pca.explained_variance_ratio_
    out: dict[str, Any] = {
        "n_prompts": int(z.shape[0]), "n_features": int(z.shape[1]), "n_components": int(k),
        "pc1": float(ratio[0]), "pc2": float(ratio[1]), "pc12": float(ratio[0] + ratio[1]),
        "participation_ratio_top": float(ev.sum() ** 2 / (np.sum(ev**2) + 1e-12)),
        "top_eigenvalues": ev.tolist(),
        "pearson_pc1_entropy": float(np.corrcoef(coords[:, 0], h)[0, 1]),
        "pearson_pc2_entropy": float(np.corrcoef(coords[:, 1], h)[0, 1]),
        "entropy_nats": h.tolist(),
    }
    if n_boot:
        rng = np.random.default_rng(seed)
        boot = np.array([PCA(n_components=2, svd_solver="full").fit(z[rng.integers(0, len(z), len(z))]).explained_variance_ratio_
                         for _ in range(n_boot)])
        out.update(pc1_ci=np.percentile(boot[:, 0], [2.5, 97.5]).tolist(),
                   pc12_ci=np.percentile(boot.sum(1), [2.5, 97.5]).tolist(), n_boot=int(n_boot))
    return out


@dataclass(frozen=True, eq=False)
class Paper3AuthorsResult:
    """The authors' variant of Paper III's protocol on one model and prompt set.

    Attributes:
        layers: the layers of the per-layer series.
        value_manifold: :func:`authors_value_manifold` of the final layer's concatenated values.
        key_cos_kv: per layer, final-token key |cos| between the n_kv real key heads.
        key_cos_query_heads: the same over the n_heads query heads (repeat-kv).
        attention_entropy_bits: per layer, per-head final-token attention entropy (bits), mean over heads and prompts.
        gqa_reshape: what the authors' own reshaping does on this model (:func:`authors_gqa_reshape`).
    """

    layers: list[int]
    value_manifold: dict
    key_cos_kv: np.ndarray
    key_cos_query_heads: np.ndarray
    attention_entropy_bits: np.ndarray
    n_prompts: int
    gqa_reshape: str

    @property
    def attention_entropy_reduction(self) -> float:
        first, last = float(self.attention_entropy_bits[0]), float(self.attention_entropy_bits[-1])
        return float("nan") if first <= 0 else (first - last) / first

    def key_share_below(self, threshold: float = 0.20) -> float:
        return float(np.mean(self.key_cos_kv < threshold))

    @property
    def criteria(self) -> dict[str, bool]:
        """Paper III's thresholds on the authors' numbers (final-layer shares; key |cos| of the kv heads)."""
        vm = self.value_manifold
        return {
            "value_manifold": bool(vm["pc1"] > 0.30 or vm["pc12"] > 0.30),
            "key_orthogonality": bool(self.key_share_below() >= 0.5),
            "attention_focusing": bool(self.attention_entropy_reduction > 0.30),
        }

    def summary(self) -> dict[str, Any]:
        return {
            "protocol": "authors", "source": AUTHORS_SOURCE, "n_prompts": self.n_prompts,
            "final_layer": int(self.layers[-1]), "value_manifold": self.value_manifold,
            "key_cos_kv_range": [float(np.nanmin(self.key_cos_kv)), float(np.nanmax(self.key_cos_kv))],
            "key_cos_kv_share_below_0.20": self.key_share_below(),
            "key_cos_query_heads_range": [float(self.key_cos_query_heads.min()), float(self.key_cos_query_heads.max())],
            "attention_entropy_reduction": self.attention_entropy_reduction,
            "criteria": self.criteria, "n_criteria_met": sum(self.criteria.values()), "gqa_reshape": self.gqa_reshape,
        }

    def to_dict(self) -> dict[str, Any]:
        d = self.summary()
        d.update(layers=[int(x) for x in self.layers], key_cos_kv=self.key_cos_kv.tolist(),
                 key_cos_query_heads=self.key_cos_query_heads.tolist(),
                 attention_entropy_bits=self.attention_entropy_bits.tolist())
        return d

    def to_dataframe(self):
        import pandas as pd

        return pd.DataFrame({"layer": self.layers, "key_cos_kv": self.key_cos_kv,
                             "key_cos_query_heads": self.key_cos_query_heads,
                             "attention_entropy_bits": self.attention_entropy_bits})

    def plot(self, ax=None):
        import matplotlib.pyplot as plt

        if ax is None:
            _, ax = plt.subplots(figsize=(6, 3.8))
        ax.plot(self.layers, self.key_cos_kv, "s-", label="final-token key |cos| (kv heads)")
        ax.plot(self.layers, self.key_cos_query_heads, "s--", label="final-token key |cos| (query heads)")
        ax.plot(self.layers, self.attention_entropy_bits / max(float(self.attention_entropy_bits[0]), 1e-12), "^-",
                label="attention entropy / layer 0")
        ax.axhline(0.20, color="gray", ls="--", lw=1)
        ax.set_xlabel("layer")
        vm = self.value_manifold
        ax.set_title(f"authors' protocol: final-layer PC1+PC2 {100 * vm['pc12']:.1f}% ({self.n_prompts} prompts)", fontsize=9)
        ax.legend(fontsize=7)
        return ax


def finalize_authors(layers: list[int], rows: torch.Tensor, entropy: torch.Tensor, keys: FinalTokenKeyCosAccumulator,
                     attention_entropy_nats: np.ndarray, n_prompts: int, gqa_reshape: str, n_boot: int) -> Paper3AuthorsResult:
    kc = keys.finalize()
    return Paper3AuthorsResult(
        layers=list(layers),
        value_manifold=authors_value_manifold(rows.numpy(), entropy.numpy(), n_boot=n_boot),
        key_cos_kv=kc["kv"], key_cos_query_heads=kc["query_heads"],
        attention_entropy_bits=np.asarray(attention_entropy_nats) / _LN2,
        n_prompts=n_prompts, gqa_reshape=gqa_reshape,
    )
