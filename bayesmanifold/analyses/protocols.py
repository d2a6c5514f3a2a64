"""Named protocols: each geometric claim measured as the authors' code measures it, beside ours.

Part of every gap between a paper's number and ours is definition, not model. This module names,
per claim, the protocol of the authors' code (vishalmisra/bayesian-wind-tunnel at 670c6d6; the file
each follows is in :data:`PROTOCOLS`) and ours, and measures the authors' protocol on a wind-tunnel
model (ours is the geometry suite's, :mod:`bayesmanifold.report.measure`):

- **value manifold** (``geometric_analysis.py``): final residual stream *after the final norm*,
  pooled over every value position (odd index) of 50 × 64 sequences, unstandardised PCA, PCs
  correlated (Pearson) with log2(V − |seen|); ``qkv_analysis.py value-manifold``: the same at the
  last position of each prefix (our scored positions). Both with the position control of
  :mod:`.final_manifold`.
- **attention focusing** (``analyze_icl_sula.py``, their only implementation, written for LLMs):
  per-head entropy (bits) of the final token's attention row, averaged over heads, then over
  prompts; reduction of the last layer relative to the first. On a wind tunnel a "prompt" is a
  prefix ending at a scored position (elimination on bijection, retrieval on recall, an
  observation on HMM); by causality its final row is the row at that position of the full sequence.
- **calibration on HMM** (``eval_length_gen.py``): mean KL(p_true ‖ p_model) in bits over the
  observation positions of 200 sequences at K = 15 (their training default); averaged over
  (sequence, position) pairs, which equals the mean over positions of the per-position mean
  because every sequence has K positions. Ours: entropy MAE = mean over positions of
  |mean over sequences of model entropy − mean over sequences of Bayes entropy|.
- **frame first**: ours is the attention/value drift rule of :mod:`bayesmanifold.analyses.dynamics`;
  the authors' (``experiments/jlens/run_phase5.py``: overlap of rank-8 Jacobian-lens subspaces
  with the embedding frame against 500 random subspaces) is not built here. It needs, per source
  position, the Gram matrix of the Jacobians of the 20 hypothesis logits at every later position
  with respect to the residual stream after the embedding and after block 0 (one backward pass per
  target position, the cotangent dimensions batched; ``experiments/jlens/extract.py``), its top-8
  eigenvectors, and their projection overlap with the span of the normalised hypothesis-token
  embeddings; capture delivers gradients at the attention sites and the embedding, not yet at
  ``resid_post``.
"""

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

from ..errors import ConfigError, InputError, ModelError
from ..hooks import Batch, capture, model_access
from .attention import AttentionEntropyAccumulator
from .final_manifold import FinalResidualAccumulator

__all__ = ["PROTOCOL_NAMES", "PROTOCOLS", "ProtocolConfig", "ProtocolResult", "measure_protocols"]

PROTOCOL_NAMES = ("ours", "authors")
_REPO = "vishalmisra/bayesian-wind-tunnel@670c6d6"
_LN2 = float(np.log(2.0))

#: claim -> protocol -> (definition, source). "ours" cites this package's module.
PROTOCOLS: dict[str, dict[str, tuple[str, str]]] = {
    "value_manifold": {
        "authors": ("final residual after the final norm, every value position (odd index) of 50 × 64 sequences, "
                    "unstandardised PCA, Pearson r of PCs with log2(V − |seen|)",
                    f"{_REPO}: experiments/paper1_bijection/figures/geometric_analysis.py (and qkv_analysis.py "
                    "value-manifold at each prefix's last position)"),
        "ours": ("final-layer residual stream (hook_resid_post, before the final norm) at the scored positions, "
                 "unstandardised PCA, Spearman ρ of PC1 with the Bayes entropy", "bayesmanifold.report.measure"),
    },
    "attention_focusing": {
        "authors": ("per-head entropy (bits) of the prompt-final token's attention row, mean over heads then prompts; "
                    "reduction last layer vs first; a prompt = a prefix ending at a scored position",
                    f"{_REPO}: experiments/paper3_llm/sula_pipeline/analyze_icl_sula.py (no wind-tunnel script computes it)"),
        "ours": ("per-head attention entropy (nats) at the scored positions, mean over queries then heads; "
                 "reduction first → last layer", "bayesmanifold.analyses.attention"),
    },
    "calibration": {
        "authors": ("HMM: mean KL(p_true ‖ p_model) in bits over (sequence, observation position), 200 sequences, K = 15",
                    f"{_REPO}: experiments/paper1_hmm/eval_length_gen.py"),
        "ours": ("entropy MAE = mean_t |mean_n H_model − mean_n H_Bayes| (bits), softmax restricted to the answer block",
                 "bayesmanifold.windtunnels.calibration"),
    },
    "frame_first": {
        "authors": ("overlap of rank-8 Jacobian-lens subspaces with the embedding frame / mean over 500 random subspaces "
                    "(not built here)", f"{_REPO}: experiments/jlens/run_phase5.py"),
        "ours": ("attention-pattern drift vs value drift between snapshots, stabilisation step of each",
                 "bayesmanifold.analyses.dynamics"),
    },
}


@dataclass(frozen=True, kw_only=True)
class ProtocolConfig:
    """How much data the authors' protocols use (their counts by default).

    Attributes:
        n_seqs: sequences for the value manifold and focusing (the authors: 50 batches × 64).
        hmm_samples: sequences for the HMM KL (theirs: 200); hmm_K: its observation count (theirs: 15).
        seed: seed of the sampled sequences.
        batch_size: sequences per forward pass.
    """

    n_seqs: int = 3200
    hmm_samples: int = 200
    hmm_K: int = 15
    seed: int = 0
    batch_size: int = 256

    def __post_init__(self) -> None:
        for name in ("n_seqs", "hmm_samples", "hmm_K", "batch_size"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"{name} must be a positive int; got {v!r}")
        if self.n_seqs < 2:
            raise ConfigError(f"n_seqs must be >= 2 (a PCA needs rows); got {self.n_seqs}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed < 2**32:
            raise ConfigError(f"seed must be an int in 0..2**32-1; got {self.seed!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True, eq=False)
class ProtocolResult:
    """The authors' protocols measured on one model (JSON-able numbers per claim).

    Attributes:
        task: the wind tunnel's parameters.
        numbers: ``{claim: {variant: {...}}}`` (see :meth:`to_dict`).
        manifolds: the :class:`~.final_manifold.FinalManifoldResult` of each pooled position set.
        focusing: the :class:`~.attention.AttentionEntropyResult` of each query-position set.
    """

    task: dict
    numbers: dict
    manifolds: dict = field(default_factory=dict)
    focusing: dict = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"task": self.task, **self.numbers}

    def to_dataframe(self):
        """One row per (claim, variant, number)."""
        import pandas as pd

        rows = []
        for claim, variants in self.numbers.items():
            if not isinstance(variants, dict):
                continue
            for variant, d in variants.items():
                if isinstance(d, dict):
                    rows += [{"claim": claim, "variant": variant, "number": k, "value": v}
                             for k, v in d.items() if isinstance(v, int | float) and not isinstance(v, bool)]
        return pd.DataFrame(rows, columns=["claim", "variant", "number", "value"])

    def plot(self, ax=None):
        """Per layer, the authors' focusing entropy (bits) of each query-position set."""
        import matplotlib.pyplot as plt

        if ax is None:
            _, ax = plt.subplots(figsize=(5, 3.2))
        for name, res in self.focusing.items():
            ax.plot(res.layers, res.per_layer / _LN2, "o-", label=f"{name}: {100 * res.reduction:.0f}% reduction")
        ax.set_xlabel("layer")
        ax.set_ylabel("attention entropy (bits)")
        ax.set_title("attention focusing, authors' protocol", fontsize=9)
        ax.legend(fontsize=7)
        return ax


def _query_sets(task: Any, positions: torch.Tensor, P: int) -> dict[str, torch.Tensor]:
    """Query-position masks [P] for focusing: every scored position, the last one, and (bijection)
    the value positions."""
    name = {"bijection": "elimination", "recall": "retrieval", "hmm": "observation"}.get(task.NAME, "scored")
    every = torch.zeros(P, dtype=torch.bool)
    every[positions] = True
    last = torch.zeros(P, dtype=torch.bool)
    last[positions[-1]] = True
    sets = {name: every, f"{name}_final": last}
    return sets


def _manifold_sets(task: Any, positions: torch.Tensor, P: int) -> dict[str, torch.Tensor]:
    """Pooled position sets: the bijection's value positions (the script of the figure) and each
    prefix's last position (the scored positions)."""
    sets = {}
    if task.NAME == "bijection" and int(positions.max()) + 1 < P:
        sets["value_positions"] = positions + 1
    sets["prefix_last"] = positions
    return sets


def _frame_and_manifold(model: Any, task: Any, config: ProtocolConfig) -> tuple[dict, dict, dict]:
    acc = model_access(model)
    batch = task.sample(config.n_seqs, generator=config.seed)
    toks, positions = batch.tokens, batch.positions
    B, P = toks.shape
    h_scored = batch.bayes_entropy_bits().to(torch.float64)  # [B, n_sup]
    layers = list(range(acc.n_layers))
    msets = _manifold_sets(task, positions, P)
    qsets = _query_sets(task, positions, P)
    pos_index = torch.arange(P).expand(B, P)
    numbers: dict[str, Any] = {"value_manifold": {}, "attention_focusing": {}}
    manifolds, focusing = {}, {}
    # one capture per position set: the scored mask is the batch's own
    for name, where in msets.items():
        ent = torch.full((B, P), float("nan"), dtype=torch.float64)
        ent[:, where] = h_scored  # value position 2k+1 carries the entropy of the answer it reveals
        mask = torch.zeros(B, P, dtype=torch.bool)
        mask[:, where] = True
        fr = FinalResidualAccumulator(label=name)
        with capture(model, accumulators=[fr], gradients=False, layers=layers[-1]) as cap:
            for s in range(0, B, config.batch_size):
                sl = slice(s, s + config.batch_size)
                cap.run(Batch(tokens=toks[sl], positions=mask[sl],
                              labels={"bayes_entropy": ent[sl], "position": pos_index[sl]}))
        manifolds[name] = fr.finalize()
        numbers["value_manifold"][name] = manifolds[name].to_dict()
    for name, where in qsets.items():
        ea = AttentionEntropyAccumulator(layers, acc.n_heads)
        with capture(model, accumulators=[ea], gradients=False) as cap:
            for s in range(0, B, config.batch_size):
                sl = slice(s, s + config.batch_size)
                cap.run(Batch(tokens=toks[sl], positions=where.expand(toks[sl].shape[0], P)))
        res = ea.finalize()
        focusing[name] = res
        bits = (res.per_layer / _LN2).tolist()
        numbers["attention_focusing"][name] = {
            "entropy_bits_per_layer": bits,
            "reduction": res.reduction,
            "reduction_to_min_layer": float((bits[0] - min(bits)) / bits[0]) if bits[0] > 0 else float("nan"),
            "n_queries": res.n_queries,
        }
    return numbers, manifolds, focusing


def _hmm_calibration(model: Any, task: Any, config: ProtocolConfig) -> dict[str, Any]:
    from ..windtunnels.calibration import measure_calibration

    n_ctx = model_access(model).n_ctx
    out: dict[str, Any] = {}
    for K in sorted({config.hmm_K, task.K}):
        t = task.with_K(K)
        if t.seq_len > n_ctx:
            out[f"K{K}"] = {"skipped": f"K={K} needs {t.seq_len} positions, the model has {n_ctx}"}
            continue
        r = measure_calibration(model, t, n_seqs=config.hmm_samples, generator=config.seed)
        out[f"K{K}"] = {"mean_kl_bits": r.mean_kl_bits, "entropy_mae_bits": r.entropy_mae_bits,
                        "n_seqs": r.n_seqs, "K": K}
    return out


def measure_protocols(model: Any, task: Any, config: ProtocolConfig | None = None) -> ProtocolResult:
    """The authors' protocols of every claim on ``model`` trained on wind tunnel ``task``.

    Example:
        >>> model, task, _, _ = load_checkpoint("bijection-v20")  # doctest: +SKIP
        >>> res = measure_protocols(model, task)  # doctest: +SKIP
        >>> res.numbers["value_manifold"]["value_positions"]["pc1_share"]  # doctest: +SKIP
    """
    config = config or ProtocolConfig()
    if task is None or not hasattr(task, "sample") or hasattr(task, "evaluate"):
        raise InputError("the authors' protocols need a wind tunnel with an exact posterior (bijection, hmm, recall)")
    try:
        model_access(model)
    except ModelError:
        raise InputError(f"the protocols need an attention model; got a {type(model).__name__}") from None
    was_training = getattr(model, "training", False)
    model.eval()
    try:
        numbers, manifolds, focusing = _frame_and_manifold(model, task, config)
        if task.NAME == "hmm":
            numbers["calibration"] = _hmm_calibration(model, task, config)
    finally:
        model.train(was_training)
    numbers["frame_first"] = {"authors": {"built": False, "note": PROTOCOLS["frame_first"]["authors"][0]}}
    numbers["protocols"] = {claim: {p: {"definition": d, "source": s} for p, (d, s) in v.items()}
                            for claim, v in PROTOCOLS.items()}
    numbers["config"] = config.to_dict()
    return ProtocolResult(task.to_dict(), numbers, manifolds, focusing)
