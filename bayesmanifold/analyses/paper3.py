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
largest, which is reported); (2) key orthogonality < 0.20 in ≥ 50% of layers; (3) > 30%
attention-entropy reduction first → last layer.

Prompts run one at a time (no padding, so the final token is the last position). A model without
a tokenizer but with d_vocab ≥ 256 reads prompts as UTF-8 bytes (as the toy models do).
"""

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import InputError
from .geometry import AttentionEntropyAccumulator, key_orthogonality
from .manifold import ManifoldAccumulator, _forward_capture, _hook_model_check, _norm_layers

__all__ = ["Paper3Result", "paper3_protocol", "read_prompts", "tokenize_prompt"]

PC_THRESHOLD = 0.30
KEY_ORTH_THRESHOLD = 0.20
KEY_ORTH_LAYER_SHARE = 0.5
ENTROPY_REDUCTION_THRESHOLD = 0.30


def read_prompts(path: str | os.PathLike) -> list[str]:
    """Prompts from a text file, one per line (blank lines skipped)."""
    p = Path(path)
    if not p.is_file():
        raise InputError(f"prompts file {str(p)!r} does not exist")
    prompts = [line.rstrip("\n") for line in p.read_text(encoding="utf-8").splitlines()]
    prompts = [x for x in prompts if x.strip()]
    if not prompts:
        raise InputError(f"prompts file {str(p)!r} holds no non-empty line")
    return prompts


def tokenize_prompt(model: Any, prompt: str) -> torch.Tensor:
    """Token ids [1, pos] of one prompt (tokenizer, else UTF-8 bytes for byte-vocabulary models)."""
    if getattr(model, "tokenizer", None) is not None:
        toks = model.to_tokens(prompt, truncate=False)  # TL truncates to n_ctx silently by default
    elif model.cfg.d_vocab >= 256:
        toks = torch.tensor([list(prompt.encode("utf-8"))], dtype=torch.long)
    else:
        raise InputError("the model has no tokenizer and a vocabulary smaller than 256 bytes; pass a model with a tokenizer")
    return toks.cpu()


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

    @property
    def attention_entropy_reduction(self) -> float:
        first, last = float(self.attention_entropy[0]), float(self.attention_entropy[-1])
        return float("nan") if first <= 0 else (first - last) / first

    @property
    def key_orth_share_below(self) -> float:
        return float(np.mean(self.key_orthogonality < KEY_ORTH_THRESHOLD))

    @property
    def criteria(self) -> dict[str, bool]:
        i = self.layers.index(self.best_layer)
        return {
            "value_manifold": bool(self.pc1[i] > PC_THRESHOLD or self.pc12[i] > PC_THRESHOLD),
            "key_orthogonality": bool(self.key_orth_share_below >= KEY_ORTH_LAYER_SHARE),
            "attention_focusing": bool(self.attention_entropy_reduction > ENTROPY_REDUCTION_THRESHOLD),
        }

    @property
    def n_criteria_met(self) -> int:
        return sum(self.criteria.values())

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
        }

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
        ax.set_title(f"Paper III signature: {self.n_criteria_met}/3 criteria met ({self.n_prompts} prompts)", fontsize=9)
        ax.legend(fontsize=7)
        return ax


def paper3_protocol(
    model: Any,
    prompts: str | os.PathLike | Sequence[str],
    *,
    layers: Iterable[int] | int | None = None,
    max_prompts: int | None = None,
) -> Paper3Result:
    """Run Paper III's measurements on ``model`` over ``prompts`` (a file path or a list).

    Raises:
        InputError: no prompts, a prompt longer than the model's context (n_ctx), or fewer than
            3 prompts (a PCA over the prompts needs several samples).

    Example:
        >>> res = paper3_protocol(model, "prompts.txt")  # doctest: +SKIP
        >>> res.criteria  # doctest: +SKIP
    """
    _hook_model_check(model)
    if isinstance(prompts, str | os.PathLike):
        plist = read_prompts(prompts)
    else:
        plist = [str(p) for p in prompts]
    if max_prompts is not None:
        plist = plist[: int(max_prompts)]
    if len(plist) < 3:
        raise InputError(f"Paper III's PCA over prompts needs at least 3 prompts, got {len(plist)}")
    layer_list = _norm_layers(model, layers)
    toks_list = []
    for i, p in enumerate(plist):
        t = tokenize_prompt(model, p)
        if t.shape[1] > model.cfg.n_ctx:
            raise InputError(f"prompt {i} has {t.shape[1]} tokens, more than the model's context n_ctx={model.cfg.n_ctx}")
        if t.shape[1] == 0:
            raise InputError(f"prompt {i} is empty after tokenisation")
        toks_list.append(t)
    names_v = [f"blocks.{layer}.attn.hook_v" for layer in layer_list]
    names_p = [f"blocks.{layer}.attn.hook_pattern" for layer in layer_list]
    accs = [ManifoldAccumulator(standardize=True, feature_kind=f"values layer {layer}", scalar_name="next-token entropy") for layer in layer_list]
    ent_acc = AttentionEntropyAccumulator(layer_list, model.cfg.n_heads)
    for t in toks_list:
        store, logits = _forward_capture(model, t, names_v + names_p, return_logits=True)
        lp = torch.log_softmax(logits[0, -1].double(), -1)
        h_next = float(-(lp.exp() * lp).sum())
        for k, layer in enumerate(layer_list):
            v = store[names_v[k]][0, -1].flatten().double().cpu()  # kv heads concatenated
            accs[k].update(v[None], np.array([h_next]))
            pat = store[names_p[k]][:, :, -1:, :].double().cpu()  # final query row
            ent_acc.update(layer, pat, torch.ones(1, 1, dtype=torch.bool))
    res = [a.finalize() for a in accs]
    ko = key_orthogonality(model, definition="columns", layers=layer_list, random_init_baseline=False).per_layer
    ent = ent_acc.finalize().per_layer
    pc12 = np.array([r.pc12_share for r in res])
    return Paper3Result(
        layers=layer_list,
        pc1=np.array([r.pc1_share for r in res]),
        pc12=pc12,
        participation_ratio=np.array([r.participation_ratio for r in res]),
        spearman_pc1_entropy=np.array([np.nan if r.spearman_pc1 is None else r.spearman_pc1 for r in res]),
        key_orthogonality=np.asarray(ko),
        attention_entropy=np.asarray(ent),
        n_prompts=len(plist),
        best_layer=int(layer_list[int(np.argmax(pc12))]),
    )
