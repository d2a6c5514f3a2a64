"""Paper III's protocol on a pretrained model: the Bayesian geometry signature of an LLM.

Paper III (arXiv 2512.23752, PAPERS.md §5) looks for the wind-tunnel geometry in pretrained
models. At the final token of each prompt it measures, per layer:

- the value manifold: per-head values concatenated over heads, standardised per coordinate, PCA
  → PC1, PC1+PC2 and the participation ratio (Σλ)²/Σλ² (here: the layer's n_kv distinct value
  vectors under GQA); plus the Spearman correlation of PC1 with the next-token entropy;
- key orthogonality: the d_head columns of W_K per head, ℓ2-normalised, mean off-diagonal |cos|;
- attention entropy per head at the final token, averaged over heads (mean of entropies), and
  its reduction from the first to the last layer.

Signature criteria (Paper III): (1) PC1 or PC1+PC2 > 30% (here: in the layer where PC1+PC2 is
largest among the layers that can carry a verdict, which is reported; a layer whose PCA is
rank-limited (n ≤ d) or whose final-token values span at most 2 dimensions (PC1+PC2 = 100% by
construction, e.g. 6 prompts ending in 3 distinct tokens at layer 0) cannot: with no such layer
the criterion is untested, ``criteria["value_manifold"]`` is None and
``value_manifold_untested`` says why); (2) key orthogonality < 0.20 in ≥ 50% of layers; (3) > 30%
attention-entropy reduction first → last layer.

Prompts run in right-padded batches of ``batch_size`` (a causal model's real positions never see
the padding; each prompt is scored at its own final token; ``batch_size=1`` runs them one at a
time, unpadded), each batch in one forward-only capture pass that delivers the values, keys and
patterns of every layer and the logits (for the next-token entropy). A model without a tokenizer but with d_vocab ≥ 256 reads prompts as
UTF-8 bytes (as the toy models do).

With fewer prompts than value features (n ≤ d) the per-layer PCA is rank-limited and the shares
are inflated; the result says so (``rank_limited``) and one warning names the counts.
"""

import os
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..backends import ModelLike, model_access
from ..backends.batch import Batch
from ..errors import InputError
from ..hooks.capture import capture
from .attention import AttentionEntropyAccumulator
from .features import FeatureAccumulator, next_token_entropy
from .keys import key_orthogonality
from .manifold import ManifoldAccumulator, RankLimitedWarning
from .paper3_authors import (
    FinalTokenKeyCosAccumulator,
    Paper3AuthorsResult,
    authors_gqa_reshape,
    finalize_authors,
)

__all__ = ["Paper3Result", "paper3_protocol", "read_prompts", "tokenize_prompt", "stratified_subset", "smollm2_signature"]

PC_THRESHOLD = 0.30
KEY_ORTH_THRESHOLD = 0.20
KEY_ORTH_LAYER_SHARE = 0.5
ENTROPY_REDUCTION_THRESHOLD = 0.30


def read_prompts(path: str | os.PathLike) -> list[str]:
    """Prompts from a text file (one per line, blank lines skipped), a ``.jsonl`` file (one object
    with a ``text`` per line) or a shipped set's name (``paper3-smollm2``: see :mod:`bayesmanifold.data`)."""
    from ..data import PROMPT_SETS, read_prompt_records

    if str(path) in PROMPT_SETS or str(path).endswith(".jsonl"):
        return [r["text"] for r in read_prompt_records(path)]
    p = Path(path)
    if not p.is_file():
        raise InputError(f"prompts file {str(p)!r} does not exist (a text file, a .jsonl file, or a shipped set: "
                         f"{', '.join(PROMPT_SETS)})")
    prompts = [line.rstrip("\n") for line in p.read_text(encoding="utf-8").splitlines()]
    prompts = [x for x in prompts if x.strip()]
    if not prompts:
        raise InputError(f"prompts file {str(p)!r} holds no non-empty line")
    return prompts


def tokenize_prompt(model: ModelLike, prompt: str) -> torch.Tensor:
    """Token ids [1, pos] of one prompt (tokenizer, else UTF-8 bytes for byte-vocabulary models)."""
    return model_access(model).encode(prompt)[None]


@dataclass(frozen=True, eq=False)
class Paper3Result:
    """Per-layer geometry at the final token and the three signature criteria."""

    layers: list[int]
    pc1: np.ndarray
    pc12: np.ndarray
    participation_ratio: np.ndarray
    spearman_pc1_entropy: np.ndarray
    key_orthogonality: np.ndarray
    attention_entropy: np.ndarray
    n_prompts: int
    best_layer: int
    rank_limited: bool = False
    #: per layer: the value vectors span > 2 dimensions and n > d (a full-rank covariance); only
    #: such a layer can carry the value-manifold verdict (elsewhere PC1+PC2 is inflated, or 100% by construction)
    layer_valid: np.ndarray | None = None
    #: why the value-manifold criterion is untested ('' when it is tested)
    value_manifold_untested: str = ""
    #: the authors' variant measured in the same pass (``protocol="authors"``), else None
    authors: Paper3AuthorsResult | None = None

    @property
    def attention_entropy_reduction(self) -> float:
        first, last = float(self.attention_entropy[0]), float(self.attention_entropy[-1])
        return float("nan") if first <= 0 else (first - last) / first

    @property
    def key_orth_share_below(self) -> float:
        return float(np.mean(self.key_orthogonality < KEY_ORTH_THRESHOLD))

    @property
    def criteria(self) -> dict[str, bool | None]:
        """Each criterion: met, not met, or None (untested: see :attr:`value_manifold_untested`)."""
        i = self.layers.index(self.best_layer)
        return {
            "value_manifold": None if self.value_manifold_untested else bool(self.pc1[i] > PC_THRESHOLD or self.pc12[i] > PC_THRESHOLD),
            "key_orthogonality": bool(self.key_orth_share_below >= KEY_ORTH_LAYER_SHARE),
            "attention_focusing": bool(self.attention_entropy_reduction > ENTROPY_REDUCTION_THRESHOLD),
        }

    @property
    def n_criteria_met(self) -> int:
        return sum(v is True for v in self.criteria.values())

    @property
    def n_criteria_tested(self) -> int:
        return sum(v is not None for v in self.criteria.values())

    def summary(self) -> dict[str, Any]:
        i = self.layers.index(self.best_layer)
        return {
            "n_prompts": self.n_prompts,
            "best_layer": self.best_layer,
            "value_pc1": float(self.pc1[i]),
            "value_pc12": float(self.pc12[i]),
            "participation_ratio": float(self.participation_ratio[i]),
            "spearman_pc1_entropy": float(self.spearman_pc1_entropy[i]),
            "key_orthogonality_share_below_0.20": self.key_orth_share_below,
            "attention_entropy_reduction": self.attention_entropy_reduction,
            "criteria": self.criteria,
            "n_criteria_met": self.n_criteria_met,
            "n_criteria_tested": self.n_criteria_tested,
            "rank_limited": self.rank_limited,
            "value_manifold_untested": self.value_manifold_untested,
        }

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe: the summary and the per-layer series."""
        d = self.summary()
        d.update(
            layers=[int(x) for x in self.layers],
            pc1=self.pc1.tolist(),
            pc12=self.pc12.tolist(),
            participation_ratio_per_layer=self.participation_ratio.tolist(),
            spearman_pc1_entropy_per_layer=self.spearman_pc1_entropy.tolist(),
            key_orthogonality=self.key_orthogonality.tolist(),
            attention_entropy=self.attention_entropy.tolist(),
        )
        if self.authors is not None:
            d["authors"] = self.authors.to_dict()
        return d

    def to_dataframe(self):
        import pandas as pd

        return pd.DataFrame(
            {
                "layer": self.layers,
                "value_pc1": self.pc1,
                "value_pc12": self.pc12,
                "participation_ratio": self.participation_ratio,
                "spearman_pc1_entropy": self.spearman_pc1_entropy,
                "key_orthogonality": self.key_orthogonality,
                "attention_entropy": self.attention_entropy,
            }
        )

    def plot(self, ax=None):
        import matplotlib.pyplot as plt

        if ax is None:
            _, ax = plt.subplots(figsize=(6, 3.8))
        ax.plot(self.layers, self.pc12, "o-", label="value PC1+PC2")
        ax.plot(self.layers, self.pc1, "o--", label="value PC1")
        ax.plot(self.layers, self.key_orthogonality, "s-", label="key orthogonality (|cos|)")
        ent = self.attention_entropy / max(float(self.attention_entropy[0]), 1e-12)
        ax.plot(self.layers, ent, "^-", label="attention entropy / layer 0")
        ax.axhline(PC_THRESHOLD, color="gray", ls=":", lw=1)
        ax.axhline(KEY_ORTH_THRESHOLD, color="gray", ls="--", lw=1)
        ax.set_xlabel("layer")
        ax.set_title(f"Paper III signature: {self.n_criteria_met}/{self.n_criteria_tested} tested criteria met "
                     f"({self.n_prompts} prompts)", fontsize=9)
        ax.legend(fontsize=7)
        return ax


def paper3_protocol(
    model: ModelLike,
    prompts: str | os.PathLike | Sequence[str],
    *,
    layers: Iterable[int] | int | None = None,
    max_prompts: int | None = None,
    protocol: str = "ours",
    n_boot: int = 1000,
    batch_size: int = 8,
) -> Paper3Result:
    """Run Paper III's measurements on ``model`` over ``prompts`` (a file path, a shipped set's
    name such as ``"paper3-smollm2"``, or a list of strings).

    ``protocol="authors"`` also measures, in the same pass, the variant of the authors' code
    (:mod:`.paper3_authors`; ``n_boot`` bootstrap resamples of its value-manifold shares) and
    returns it as ``result.authors``.

    Raises:
        InputError: no prompts, a prompt longer than the model's context (n_ctx), or fewer than
            3 prompts (a PCA over the prompts needs several samples).

    Example:
        >>> res = paper3_protocol(model, "prompts.txt")  # doctest: +SKIP
        >>> res.criteria  # doctest: +SKIP
    """
    from ..data import PROMPT_SETS

    if protocol not in ("ours", "authors"):
        raise InputError(f"protocol must be 'ours' or 'authors'; got {protocol!r}")
    if isinstance(n_boot, bool) or not isinstance(n_boot, int) or n_boot < 0:
        raise InputError(f"n_boot must be an int >= 0; got {n_boot!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise InputError(f"batch_size must be an int >= 1; got {batch_size!r}")
    access = model_access(model)
    if isinstance(prompts, str) and not Path(prompts).exists() and prompts not in PROMPT_SETS:
        raise InputError(f"prompts {prompts[:60]!r} names no file: give the path of a prompts file (one prompt per line, "
                         f"or .jsonl), a shipped set ({', '.join(PROMPT_SETS)}) or a list of at least 3 prompt strings")
    if isinstance(prompts, str | os.PathLike):
        plist = read_prompts(prompts)
    else:
        plist = [str(p) for p in prompts]
    if max_prompts is not None:
        plist = plist[: int(max_prompts)]
    if len(plist) < 3:
        raise InputError(f"Paper III's PCA over prompts needs at least 3 prompts, got {len(plist)}")
    layer_list = access.norm_layers(layers)
    toks_list = []
    for i, p in enumerate(plist):
        t = tokenize_prompt(model, p)
        if access.n_ctx is not None and t.shape[1] > access.n_ctx:
            raise InputError(f"prompt {i} has {t.shape[1]} tokens, more than the model's context n_ctx={access.n_ctx}")
        if t.shape[1] == 0:
            raise InputError(f"prompt {i} is empty after tokenisation")
        toks_list.append(t)
    values = [
        FeatureAccumulator(
            kind="values_concat",  # the layer's n_kv distinct value vectors, concatenated
            layer=layer,
            output_scalar=next_token_entropy,
            dtype=torch.float64,
            pca=ManifoldAccumulator(standardize=True, feature_kind=f"values layer {layer}", scalar_name="next-token entropy"),
        )
        for layer in layer_list
    ]
    ent_acc = AttentionEntropyAccumulator(layer_list, access.n_heads)
    extra: list = []
    if protocol == "authors":  # the final layer's raw rows (their PCA keeps 10 components) and the keys
        extra = [FeatureAccumulator(kind="values_concat", layer=layer_list[-1], output_scalar=next_token_entropy, dtype=torch.float64),
                 FinalTokenKeyCosAccumulator(layer_list, access.n_heads, access.n_kv_heads)]
    with capture(model, accumulators=[*values, ent_acc, *extra], layers=layer_list) as cap:
        for s in range(0, len(toks_list), batch_size):  # right padding: a causal model's real positions never see it
            chunk = toks_list[s:s + batch_size]
            toks = torch.zeros(len(chunk), max(t.shape[1] for t in chunk), dtype=torch.long)
            last = torch.zeros(toks.shape, dtype=torch.bool)
            for j, t in enumerate(chunk):
                toks[j, : t.shape[1]] = t[0]
                last[j, t.shape[1] - 1] = True
            cap.run(Batch(tokens=toks, positions=last))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RankLimitedWarning)  # one warning below, not one per layer
        res = [a.finalize() for a in values]
    rank_limited = any(r.rank_limited for r in res)
    if rank_limited:
        d = max(r.n_features for r in res)
        warnings.warn(
            f"Paper III protocol: {len(plist)} prompts for up to {d} value features per layer: the PCA is "
            f"rank-limited (rank ≤ {len(plist) - 1}) and PC1/PC1+PC2 are inflated; at least {d + 1} prompts "
            "(n_features + 1) are needed for a full-rank covariance",
            RankLimitedWarning,
            stacklevel=2,
        )
    ko = key_orthogonality(model, definition="columns", layers=layer_list, random_init_baseline=False).per_layer
    ent = ent_acc.finalize().per_layer
    authors = None
    if extra:
        authors = finalize_authors(layer_list, extra[0].features, torch.cat(extra[0].scalars), extra[1], ent, len(plist),
                                   authors_gqa_reshape(access.n_heads, access.n_kv_heads, access.d_head), n_boot)
    pc12 = np.array([r.pc12_share for r in res])
    ranks = [_effective_rank(r.explained_variance) for r in res]
    valid = np.array([not r.rank_limited and k > 2 for r, k in zip(res, ranks)])
    untested = ""
    if not valid.any():
        d = max(r.n_features for r in res)
        untested = (f"untested: too few distinct prompts ({len(plist)} prompts, whose final-token value vectors span at "
                    f"most {max(ranks)} dimensions in any layer; needed: more than {d} prompts with distinct final "
                    f"contexts, for a full-rank covariance of the {d} value features)")
    pick = np.where(valid, pc12, -np.inf) if valid.any() else pc12
    return Paper3Result(
        layers=layer_list,
        pc1=np.array([r.pc1_share for r in res]),
        pc12=pc12,
        participation_ratio=np.array([r.participation_ratio for r in res]),
        spearman_pc1_entropy=np.array([np.nan if r.spearman_pc1 is None else r.spearman_pc1 for r in res]),
        key_orthogonality=np.asarray(ko),
        attention_entropy=np.asarray(ent),
        n_prompts=len(plist),
        best_layer=int(layer_list[int(np.argmax(pick))]),
        rank_limited=rank_limited,
        layer_valid=valid,
        value_manifold_untested=untested,
        authors=authors,
    )


def stratified_subset(records: Sequence[dict], per_quintile: int, seed: int = 0) -> list[dict]:
    """``per_quintile`` records of each entropy quintile (records carry ``quintile`` 0-4 and ``domain``),
    the domains taken in turn, each domain's order drawn with ``numpy.random.default_rng(seed)``."""
    if isinstance(per_quintile, bool) or not isinstance(per_quintile, int) or per_quintile < 1:
        raise InputError(f"per_quintile must be an int >= 1; got {per_quintile!r}")
    rng = np.random.default_rng(seed)
    out: list[dict] = []
    for q in range(5):
        by_dom: dict[str, list[dict]] = {}
        for r in records:
            if r.get("quintile") == q:
                by_dom.setdefault(str(r.get("domain")), []).append(r)
        if sum(map(len, by_dom.values())) < per_quintile:
            raise InputError(f"quintile {q} holds {sum(map(len, by_dom.values()))} records, fewer than per_quintile={per_quintile}")
        queues = [[v[i] for i in rng.permutation(len(v))] for _, v in sorted(by_dom.items())]
        picked: list[dict] = []
        while len(picked) < per_quintile:
            for qu in queues:
                if qu and len(picked) < per_quintile:
                    picked.append(qu.pop(0))
        out += picked
    return out


def smollm2_signature(model: ModelLike | None = None, *, per_quintile: int = 3, seed: int = 0, protocol: str = "ours",
                      n_boot: int = 1000) -> Paper3Result:
    """Paper III's signature of SmolLM2-135M on a stratified subset of the shipped ``paper3-smollm2`` set.

    ``per_quintile`` prompts of each entropy quintile (3: 15 prompts, sized for a demo). With fewer
    prompts than the 192 value features of a layer the value-manifold criterion is untested (the
    result says why; the rank-limited warning is not repeated); the other two are measured.

    Example:
        >>> res = smollm2_signature()  # doctest: +SKIP
        >>> res.criteria  # doctest: +SKIP
    """
    from ..backends import load_model
    from ..data import read_prompt_records

    recs = stratified_subset(read_prompt_records("paper3-smollm2"), per_quintile, seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RankLimitedWarning)
        return paper3_protocol(load_model("smollm2-135m") if model is None else model, [r["text"] for r in recs],
                               protocol=protocol, n_boot=n_boot)


def _effective_rank(explained_variance: np.ndarray) -> int:
    """Directions with variance above rounding: k distinct points span at most k − 1 of them."""
    ev = np.asarray(explained_variance, dtype=float)
    total = float(ev.sum()) if ev.size else 0.0
    return int((ev > 1e-9 * total).sum()) if total > 0 else 0


