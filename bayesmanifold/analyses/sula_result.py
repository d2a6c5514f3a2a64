"""The result of the in-context Bayesian updating test (:mod:`.sula`): per prompt, the analytic and
the model's posterior over the two candidate labels and the PC1 coordinate of the query's values;
per k and per condition, the calibration (entropy MAE in bits) and how PC1 moves with the evidence.
"""

from dataclasses import dataclass
from typing import Any

import numpy as np

from .manifold import ManifoldResult
from .stats import pearson, spearman

__all__ = ["PAPER3_SULA", "SCORING", "SulaCondition", "SulaResult", "analytic_posterior", "binary_entropy_bits"]

#: Paper III's reported SULA numbers (arXiv 2512.23752), for comparison
PAPER3_SULA: dict[str, Any] = {
    "entropy_mae_bits": {"Pythia-410M": 0.44, "Llama-3.2-1B": 0.36, "Phi-2": 0.31},
    "abs_rho_pc1_entropy": [0.65, 0.80],
    "ks": [0, 1, 2, 4, 8],
    "n_per_k": 50,
    "noise": 0.1,
}

SCORING = ("whole word: log P(label) is the teacher-forced log-probability of all the label's tokens after the "
           "query ('… q:' then ' label'); the model's posterior is the two candidates' probabilities renormalised "
           "(for single-token labels, the authors' renormalised next-token softmax)")


def analytic_posterior(n_a: Any, n_b: Any, noise: float = 0.1) -> np.ndarray:
    """P(y = A | n_A labels A, n_B labels B) for a uniform prior and label noise ``noise``:
    σ((n_A − n_B) ln((1 − ε)/ε)), float64, elementwise."""
    d = np.asarray(n_a, dtype=np.float64) - np.asarray(n_b, dtype=np.float64)
    z = d * np.log((1.0 - noise) / noise)
    return 0.5 * (1.0 + np.tanh(0.5 * z))  # σ(z), stable for large |z|


def binary_entropy_bits(p: Any) -> np.ndarray:
    """Entropy in bits of a two-outcome distribution (p, 1 − p), elementwise (0 at p ∈ {0, 1})."""
    p = np.clip(np.asarray(p, dtype=np.float64), 0.0, 1.0)
    q = 1.0 - p
    with np.errstate(divide="ignore", invalid="ignore"):
        h = -(np.where(p > 0, p * np.log2(p), 0.0) + np.where(q > 0, q * np.log2(q), 0.0))
    return h


def _f(x: float | None) -> float | None:
    """JSON-safe: nan and None become None."""
    return None if x is None or not np.isfinite(x) else float(x)


def _by_k(k: np.ndarray, x: np.ndarray) -> dict[int, float]:
    return {int(v): float(np.mean(x[k == v])) for v in np.unique(k)}


@dataclass(frozen=True, eq=False)
class SulaCondition:
    """One condition (``main``, ``shuffled`` or ``lexical_remap``), prompt by prompt.

    Attributes:
        k, n_a, n_b: examples shown and how many were labelled A and B.
        label_a, label_b: the candidate words; latent: 0 if the latent label is A, 1 if B.
        analytic_p_a, analytic_entropy: the exact posterior of the task (shuffled: 1/2, 1 bit).
        evidence_p_a, evidence_entropy: the noisy-label observer's posterior from the counts (equal
            to the analytic one except under shuffled labels).
        logp_a, logp_b: the model's whole-word log-probabilities; model_p_a, model_entropy: its
            renormalised posterior and that posterior's entropy in bits.
        pc1: the query's values on PC1 of this condition's PCA (sign: positive with the entropy).
        manifold: that PCA.
    """

    name: str
    texts: list[str]
    k: np.ndarray
    n_a: np.ndarray
    n_b: np.ndarray
    label_a: list[str]
    label_b: list[str]
    latent: np.ndarray
    analytic_p_a: np.ndarray
    analytic_entropy: np.ndarray
    evidence_p_a: np.ndarray
    evidence_entropy: np.ndarray
    logp_a: np.ndarray
    logp_b: np.ndarray
    model_p_a: np.ndarray
    model_entropy: np.ndarray
    pc1: np.ndarray
    manifold: ManifoldResult

    @classmethod
    def build(cls, name: str, ps: Any, logp_a: np.ndarray, logp_b: np.ndarray, truth_h: np.ndarray,
              evidence_h: np.ndarray, noise: float, manifold: ManifoldResult) -> "SulaCondition":

        evidence_p = analytic_posterior(ps.n_a, ps.n_b, noise)
        model_p = 0.5 * (1.0 + np.tanh(0.5 * (logp_a - logp_b)))  # σ(log P(A) − log P(B))
        pc1 = manifold.scores[:, 0].copy()
        sign = 0.0
        for ref in (truth_h, evidence_h, binary_entropy_bits(model_p)):
            r = pearson(pc1, ref)
            if np.isfinite(r) and r != 0:
                sign = np.sign(r)
                break
        return cls(
            name=name, texts=list(ps.texts), k=ps.k, n_a=ps.n_a, n_b=ps.n_b,
            label_a=[ps.vocab[i] for i in ps.pair[:, 0]], label_b=[ps.vocab[i] for i in ps.pair[:, 1]], latent=ps.latent,
            analytic_p_a=evidence_p if ps.informative else np.full(len(ps.texts), 0.5), analytic_entropy=truth_h,
            evidence_p_a=evidence_p, evidence_entropy=evidence_h, logp_a=np.asarray(logp_a), logp_b=np.asarray(logp_b),
            model_p_a=model_p, model_entropy=binary_entropy_bits(model_p), pc1=pc1 * (sign or 1.0), manifold=manifold,
        )

    @property
    def ks(self) -> list[int]:
        return [int(v) for v in np.unique(self.k)]

    @property
    def model_p_latent(self) -> np.ndarray:
        """The model's posterior probability of the latent label."""
        return np.where(self.latent == 0, self.model_p_a, 1.0 - self.model_p_a)

    @property
    def entropy_mae_bits(self) -> float:
        """Mean over prompts of |H_model − H_analytic| (bits)."""
        return float(np.mean(np.abs(self.model_entropy - self.analytic_entropy)))

    @property
    def evidence_mae_bits(self) -> float:
        """Mean over prompts of |H_model − H_evidence| (the noisy-label observer's entropy, bits)."""
        return float(np.mean(np.abs(self.model_entropy - self.evidence_entropy)))

    def by_k(self) -> dict[int, dict[str, float]]:
        err = np.abs(self.model_entropy - self.analytic_entropy)
        cols = {"analytic_entropy": self.analytic_entropy, "evidence_entropy": self.evidence_entropy,
                "model_entropy": self.model_entropy, "entropy_mae": err, "model_p_latent": self.model_p_latent,
                "pc1_mean": self.pc1}
        out = {k: {"n": int(np.sum(self.k == k))} for k in self.ks}
        for name, x in cols.items():
            for k, v in _by_k(self.k, x).items():
                out[k][name] = v
        for k in self.ks:
            out[k]["pc1_std"] = float(np.std(self.pc1[self.k == k]))
        return out

    def within_k(self, against: str = "analytic_entropy") -> dict[int, float | None]:
        """Per k, Spearman ρ(PC1, ``against``) among that k's prompts (None where it is constant).

        The analytic entropy falls with k, so a PC1 that only counted the examples would still
        correlate with it across k; within one k the count is fixed and only the evidence varies."""
        x = getattr(self, against)
        return {k: _f(spearman(self.pc1[self.k == k], x[self.k == k])) for k in self.ks}

    def summary(self) -> dict[str, Any]:
        by_k = self.by_k()
        ks = sorted(by_k)
        rho = spearman(self.pc1, self.analytic_entropy)
        within = self.within_k("evidence_entropy")
        defined = [(by_k[k]["n"], v) for k, v in within.items() if v is not None]
        return {
            "n_prompts": len(self.texts),
            "entropy_mae_bits": self.entropy_mae_bits,
            "entropy_mae_by_k": {k: by_k[k]["entropy_mae"] for k in ks},
            "evidence_mae_bits": self.evidence_mae_bits,
            # reference predictors: always certain (H = 0) and always uniform (H = 1 bit)
            "mae_if_always_certain_bits": float(np.mean(self.analytic_entropy)),
            "mae_if_always_uniform_bits": float(np.mean(1.0 - self.analytic_entropy)),
            "model_entropy_by_k": {k: by_k[k]["model_entropy"] for k in ks},
            "analytic_entropy_by_k": {k: by_k[k]["analytic_entropy"] for k in ks},
            "model_p_latent_by_k": {k: by_k[k]["model_p_latent"] for k in ks},
            "pc1_mean_by_k": {k: by_k[k]["pc1_mean"] for k in ks},
            "rho_k_mean_pc1": _f(spearman(np.array(ks, float), np.array([by_k[k]["pc1_mean"] for k in ks]))),
            "rho_k_pc1_prompts": _f(spearman(self.k.astype(float), self.pc1)),
            "rho_pc1_analytic_entropy": _f(rho),
            "abs_rho_pc1_analytic_entropy": _f(abs(rho)),
            "pearson_pc1_analytic_entropy": _f(pearson(self.pc1, self.analytic_entropy)),
            "rho_pc1_model_entropy": _f(spearman(self.pc1, self.model_entropy)),
            "abs_rho_k_analytic_entropy": _f(abs(spearman(self.k.astype(float), self.analytic_entropy))),
            "rho_pc1_evidence_entropy_within_k": within,
            "rho_pc1_evidence_entropy_within_k_mean": (
                _f(sum(n * v for n, v in defined) / sum(n for n, _ in defined)) if defined else None),
            "pc1_share": self.manifold.pc1_share,
            "pc12_share": self.manifold.pc12_share,
        }

    def records(self) -> list[dict[str, Any]]:
        """One dict per prompt (the rows of :meth:`SulaResult.to_dataframe`)."""
        return [
            {"condition": self.name, "prompt": i, "k": int(self.k[i]), "n_a": int(self.n_a[i]), "n_b": int(self.n_b[i]),
             "label_a": self.label_a[i], "label_b": self.label_b[i], "latent": self.label_a[i] if self.latent[i] == 0 else self.label_b[i],
             "analytic_p_a": float(self.analytic_p_a[i]), "analytic_entropy": float(self.analytic_entropy[i]),
             "evidence_entropy": float(self.evidence_entropy[i]), "logp_a": float(self.logp_a[i]),
             "logp_b": float(self.logp_b[i]), "model_p_a": float(self.model_p_a[i]),
             "model_entropy": float(self.model_entropy[i]), "pc1": float(self.pc1[i]), "text": self.texts[i]}
            for i in range(len(self.texts))
        ]


@dataclass(frozen=True, eq=False)
class SulaResult:
    """The SULA test on one model: conditions, the shared PC1, and the headline numbers.

    Attributes:
        config: the :class:`~bayesmanifold.analyses.sula.SulaConfig` run.
        conditions: ``{"main": SulaCondition, ["shuffled": …, "lexical_remap": …]}``.
        shared_pc1: per condition, PC1 of one PCA over all conditions (oriented by main).
        layer, feature_kind, n_features: where the values were read and how many coordinates.
        label_tokens: tokens per label word (after a query); >1 means scored as a whole word.
        rank_limited: a PCA had no more prompts than features (shares inflated).
        seconds: wall time of the test (prompts, passes, PCA).
    """

    config: Any
    conditions: dict[str, SulaCondition]
    shared_pc1: dict[str, np.ndarray]
    layer: int
    feature_kind: str
    n_features: int
    label_tokens: dict[str, int]
    rank_limited: bool
    seconds: float

    @classmethod
    def build(cls, *, conditions: dict[str, SulaCondition], shared_scores: np.ndarray, **kw: Any) -> "SulaResult":
        sizes = np.cumsum([0] + [len(c.texts) for c in conditions.values()])
        shared = {n: shared_scores[a:b].copy() for n, a, b in zip(conditions, sizes[:-1], sizes[1:])}
        main = conditions["main"]
        r = pearson(shared["main"], main.analytic_entropy)
        if np.isfinite(r) and r < 0:
            shared = {n: -v for n, v in shared.items()}
        return cls(conditions=conditions, shared_pc1=shared, **kw)

    @property
    def main(self) -> SulaCondition:
        return self.conditions["main"]

    def controls(self) -> dict[str, dict[str, Any]]:
        """Each control's headline numbers (empty without ``controls``)."""
        out: dict[str, dict[str, Any]] = {}
        main = self.main
        for name, c in self.conditions.items():
            if name == "main":
                continue
            s = c.summary()
            d = {"entropy_mae_bits": s["entropy_mae_bits"], "evidence_mae_bits": s["evidence_mae_bits"],
                 "model_entropy_by_k": s["model_entropy_by_k"], "analytic_entropy_by_k": s["analytic_entropy_by_k"],
                 "model_p_latent_by_k": s["model_p_latent_by_k"],
                 "shared_pc1_mean_by_k": _by_k(c.k, self.shared_pc1[name]),
                 "rho_pc1_evidence_entropy": _f(spearman(c.pc1, c.evidence_entropy)),
                 "rho_pc1_evidence_entropy_within_k_mean": s["rho_pc1_evidence_entropy_within_k_mean"],
                 "rho_k_mean_pc1": s["rho_k_mean_pc1"]}
            if name == "lexical_remap":
                d["mean_abs_entropy_diff_vs_main"] = float(np.mean(np.abs(c.model_entropy - main.model_entropy)))
                d["pearson_entropy_vs_main"] = _f(pearson(c.model_entropy, main.model_entropy))
            out[name] = d
        return out

    def summary(self) -> dict[str, Any]:
        s = self.main.summary()
        return {
            "scoring": SCORING,
            "label_tokens": dict(self.label_tokens),
            "layer": self.layer,
            "feature_kind": self.feature_kind,
            "n_features": self.n_features,
            **s,
            "shared_pc1_mean_by_k": {n: _by_k(c.k, self.shared_pc1[n]) for n, c in self.conditions.items()},
            "controls": self.controls(),
            "rank_limited": self.rank_limited,
            "seconds": self.seconds,
            "paper3": PAPER3_SULA,
        }

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe: the config, the summary and every prompt's row."""
        return {"config": self.config.to_dict(), **self.summary(),
                "prompts": [r | {"shared_pc1": float(self.shared_pc1[r["condition"]][r["prompt"]])}
                            for c in self.conditions.values() for r in c.records()]}

    def to_dataframe(self):
        """One row per prompt and condition."""
        import pandas as pd

        df = pd.DataFrame([r for c in self.conditions.values() for r in c.records()])
        df["shared_pc1"] = np.concatenate([self.shared_pc1[n] for n in self.conditions])
        return df

    def plot(self, ax=None, *, what: str = "all"):
        """``what``: ``"calibration"`` (mean entropy by k, model against analytic), ``"manifold"``
        (PC1 against the analytic entropy, main condition), ``"trajectory"`` (shared PC1 by k per
        condition), each on ``ax``; or ``"all"`` (a new 1×3 figure; returns its axes)."""
        import matplotlib.pyplot as plt

        if what == "all":
            if ax is not None:
                raise ValueError("what='all' draws a figure of its own; pass ax with one of 'calibration', 'manifold', 'trajectory'")
            _, axes = plt.subplots(1, 3, figsize=(14, 4))
            for a, w in zip(axes, ("calibration", "manifold", "trajectory")):
                self.plot(a, what=w)
            axes[0].figure.tight_layout()
            return axes
        if what not in ("calibration", "manifold", "trajectory"):
            raise ValueError(f"what={what!r}: use 'all', 'calibration', 'manifold' or 'trajectory'")
        if ax is None:
            _, ax = plt.subplots(figsize=(5, 4))
        if what == "calibration":
            for i, (name, c) in enumerate(self.conditions.items()):
                bk = c.by_k()
                ks = sorted(bk)
                ax.plot(ks, [bk[k]["model_entropy"] for k in ks], "o-", color=f"C{i}", label=f"model, {name}")
                if name == "main" or not np.array_equal(c.analytic_entropy, self.main.analytic_entropy):
                    ax.plot(ks, [bk[k]["analytic_entropy"] for k in ks], "s--", color=f"C{i}", alpha=0.6,
                            label=f"analytic, {name}")
            ax.set_xlabel("k (examples)")
            ax.set_ylabel("posterior entropy (bits)")
            ax.set_title(f"entropy MAE {self.main.entropy_mae_bits:.3f} bits (Paper III: 0.31–0.44)", fontsize=9)
        elif what == "manifold":
            m = self.main
            sc = ax.scatter(m.analytic_entropy, m.pc1, c=m.k, cmap="viridis", s=12)
            ax.figure.colorbar(sc, ax=ax, label="k")
            ms = m.summary()
            rho, within = ms["abs_rho_pc1_analytic_entropy"], ms["rho_pc1_evidence_entropy_within_k_mean"]
            ax.set_xlabel("analytic entropy (bits)")
            ax.set_ylabel(f"PC1 of values, layer {self.layer}")
            ax.set_title(f"|ρ(PC1, entropy)| = {rho if rho is None else round(rho, 2)} (Paper III: 0.65–0.80); "
                         f"within one k: {within if within is None else round(within, 2)}", fontsize=9)
            return ax
        else:
            for i, (name, c) in enumerate(self.conditions.items()):
                ks = c.ks
                v = self.shared_pc1[name]
                ax.errorbar(ks, [v[c.k == k].mean() for k in ks], yerr=[v[c.k == k].std() for k in ks], marker="o",
                            capsize=3, color=f"C{i}", label=name)
            ax.set_xlabel("k (examples)")
            ax.set_ylabel("PC1 (shared PCA), mean ± sd")
            ax.set_title("PC1 by k, one PCA over the conditions", fontsize=9)
        ax.legend(fontsize=7)
        return ax
