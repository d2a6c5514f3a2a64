"""Induction heads: how much each head attends to, and is pushed toward, the induction target.

An *induction head* (Olsson et al. 2022) attends from a token to the token that followed the
token's earlier occurrence, so that it can copy it. On a **repeated random sequence**
``r_0 … r_{T−1} r_0 … r_{T−1}`` the target of the query at position ``T + t`` (the second copy of
``r_t``) is key ``t + 1``; the **induction score** of a head is the mean attention α from the
second-copy queries to their targets (:func:`repeated_random_tokens` builds such batches with
positional targets). On **real text** the target of query i is the key after the most recent
earlier occurrence of the n-gram ending at i (``min_match`` tokens, :func:`induction_targets`).

With gradients (one capture pass, the next-token loss by default) the same accumulator also
measures where the routing force −∂L/∂s = α(b̄ − b) points (Paper II, arXiv 2512.22473, §3):
the share of a query's positive force that lands on its target key (``force_share_target``), the
mean force on the target, and the fraction of targets with positive advantage. The **previous-
token score** (mean α from position i to i − 1) is recorded too: layer-0 previous-token heads are
what layer-1 induction heads compose with.
"""

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..backends import ModelLike, model_access
from ..backends.batch import Batch
from ..errors import InputError
from ..hooks import capture
from ..hooks.bundle import LayerBundle

__all__ = ["InductionAccumulator", "InductionResult", "induction_scores", "repeated_random_tokens", "induction_targets",
           "ordinary_ids"]

LABEL = "induction_target"
_SUMS = ("n", "alpha", "n_prev", "prev", "force", "pos_force_target", "pos_force_all", "adv_positive")


def repeated_random_tokens(
    n_seqs: int, half: int, *, low: int = 0, high: int, generator: torch.Generator
) -> tuple[Tensor, Tensor]:
    """``n_seqs`` sequences ``r r`` of ``2 * half`` ids drawn uniformly from ``low..high−1``, and
    their targets ``[n_seqs, 2 * half]`` (key t + 1 for the query at half + t; −1 elsewhere)."""
    if half < 2 or n_seqs < 1 or high - low < 2:
        raise InputError(f"need n_seqs >= 1, half >= 2 and at least 2 token ids; got {n_seqs}, {half}, {low}..{high - 1}")
    r = torch.randint(low, high, (n_seqs, half), generator=generator)
    targets = torch.full((n_seqs, 2 * half), -1, dtype=torch.long)
    targets[:, half:] = torch.arange(1, half + 1)
    return torch.cat([r, r], dim=1), targets


def induction_targets(tokens: Tensor, min_match: int = 2) -> Tensor:
    """Per position the key after the most recent earlier, non-overlapping occurrence of the
    ``min_match``-gram ending there (−1 where it has none): the induction target on real text.
    (Non-overlapping: in a run like ``"    "`` the target is never the query itself.)"""
    if min_match < 1:
        raise InputError(f"min_match must be >= 1, got {min_match}")
    toks = torch.as_tensor(tokens)
    toks = toks[None] if toks.dim() == 1 else toks
    out = torch.full(toks.shape, -1, dtype=torch.long)
    for b, row in enumerate(toks.tolist()):
        last: dict[tuple, int] = {}  # n-grams ending at p <= i - min_match, by their last end p
        n = min_match
        for i in range(n - 1, len(row)):
            if i - n >= n - 1:
                last[tuple(row[i - 2 * n + 1 : i - n + 1])] = i - n
            key = tuple(row[i - n + 1 : i + 1])
            if key in last:
                out[b, i] = last[key] + 1
    return out


class InductionAccumulator:
    """Per head: attention on the induction target (from ``batch.labels["induction_target"]``),
    the previous-token score and, with gradients, where the routing force points."""

    def __init__(self, *, gradients: bool = False) -> None:
        self.needs_gradients = bool(gradients)
        self.sums: dict[tuple[int, int], np.ndarray] = {}

    def update(self, b: LayerBundle) -> None:
        if b.batch is None or LABEL not in b.batch.labels:
            raise InputError(f"InductionAccumulator needs the batch label {LABEL!r} (key index per query, -1 for none)")
        tgt = b.batch.label(LABEL).to(b.pattern.device).long()
        qmask = (tgt >= 0) & b.query_valid
        bi, qi = torch.nonzero(qmask, as_tuple=True)
        kj = tgt[bi, qi]
        a = b.pattern.double()
        a_t = a[bi, :, qi, kj]  # [n, head]
        prev = torch.diagonal(a, offset=-1, dim1=-2, dim2=-1)  # α[i, i−1]: [batch, head, pos−1]
        pvalid = b.query_valid[:, 1:].to(a.dtype)[:, None, :]
        stats = [
            torch.full((len(b.heads),), float(len(bi)), dtype=torch.float64),
            a_t.sum(0).cpu(),
            pvalid.sum((0, 2)).expand(len(b.heads)).cpu(),
            (prev * pvalid).sum((0, 2)).cpu(),
        ]
        if self.needs_gradients:
            if b.grad_scores is None:
                raise InputError("InductionAccumulator(gradients=True) needs a capture with the backward pass")
            force = -b.grad_scores.double().masked_fill(~b.valid[:, None], 0.0)  # α A
            f_rows = force[bi, :, qi, :]  # [n, head, key]
            f_t = f_rows[torch.arange(len(bi)), :, kj]
            stats += [f_t.sum(0).cpu(), f_t.clamp(min=0).sum(0).cpu(), f_rows.clamp(min=0).sum((0, 2)).cpu(),
                      (f_t > 0).double().sum(0).cpu()]
        else:
            stats += [torch.full((len(b.heads),), float("nan"), dtype=torch.float64)] * 4
        arr = torch.stack(stats, dim=1).numpy()
        for k, h in enumerate(b.heads):
            key = (b.layer, h)
            self.sums[key] = self.sums[key] + arr[k] if key in self.sums else arr[k].copy()

    def merge(self, other: "InductionAccumulator") -> "InductionAccumulator":
        for key, v in other.sums.items():
            self.sums[key] = self.sums[key] + v if key in self.sums else v.copy()
        return self

    def finalize(self) -> "InductionResult":
        if not self.sums:
            raise InputError("the induction accumulator saw no layer: run a capture pass first")
        heads = sorted(self.sums)
        s = np.stack([self.sums[k] for k in heads])
        n = np.where(s[:, 0] > 0, s[:, 0], np.nan)
        with np.errstate(invalid="ignore", divide="ignore"):
            share = np.where(s[:, 6] > 0, s[:, 5] / s[:, 6], np.nan)
            prev = s[:, 3] / np.where(s[:, 2] > 0, s[:, 2], np.nan)
        return InductionResult(heads=heads, score=s[:, 1] / n, prev_token=prev, mean_force_target=s[:, 4] / n,
                               force_share_target=share, frac_force_positive=s[:, 7] / n, n_queries=int(s[0, 0]))


@dataclass(frozen=True, eq=False)
class InductionResult:
    """Per head (``heads[k] = (layer, head)``): ``score`` mean α on the induction target;
    ``prev_token`` mean α on the previous token; with gradients ``mean_force_target`` (mean
    −∂L/∂s on the target), ``force_share_target`` (positive force on targets / all positive force
    of those queries) and ``frac_force_positive`` (targets with A > 0); NaN without gradients."""

    heads: list[tuple[int, int]]
    score: np.ndarray
    prev_token: np.ndarray
    mean_force_target: np.ndarray
    force_share_target: np.ndarray
    frac_force_positive: np.ndarray
    n_queries: int

    _COLUMNS = ("score", "prev_token", "mean_force_target", "force_share_target", "frac_force_positive")

    def to_dataframe(self):
        import pandas as pd

        return pd.DataFrame([{"layer": L, "head": h, **{c: float(getattr(self, c)[k]) for c in self._COLUMNS}}
                             for k, (L, h) in enumerate(self.heads)])

    def to_dict(self) -> dict[str, Any]:
        return {"n_queries": self.n_queries,
                "heads": [{"layer": L, "head": h, **{c: float(getattr(self, c)[k]) for c in self._COLUMNS}}
                          for k, (L, h) in enumerate(self.heads)]}

    def grid(self, what: str = "score") -> np.ndarray:
        """``[layer, head]`` array of one column (NaN for heads not measured)."""
        n_l = max(L for L, _ in self.heads) + 1
        n_h = max(h for _, h in self.heads) + 1
        g = np.full((n_l, n_h), np.nan)
        for k, (L, h) in enumerate(self.heads):
            g[L, h] = getattr(self, what)[k]
        return g

    def plot(self, ax=None, what: str = "score"):
        """Heat map of ``what`` (default: the induction score) per layer and head."""
        import matplotlib.pyplot as plt

        if ax is None:
            _, ax = plt.subplots(figsize=(4.5, 2.8))
        g = self.grid(what)
        im = ax.imshow(g, vmin=0, vmax=1 if what in ("score", "prev_token", "force_share_target", "frac_force_positive") else None,
                       cmap="viridis", aspect="auto")
        for (L, h), v in np.ndenumerate(g):
            ax.text(h, L, f"{v:.2f}", ha="center", va="center", fontsize=7, color="w" if v < 0.6 else "k")
        ax.set_xlabel("head")
        ax.set_ylabel("layer")
        ax.set_xticks(range(g.shape[1]))
        ax.set_yticks(range(g.shape[0]))
        ax.set_title(f"induction: {what}", fontsize=9)
        ax.figure.colorbar(im, ax=ax)
        return ax


def ordinary_ids(access: Any) -> tuple[int, int]:
    """The id range random probe tokens are drawn from: printable ASCII for a 256-id byte
    vocabulary without tokenizer; else every id but the tokenizer's special tokens at either end
    (a BPE checkpoint's ``<|endoftext|>`` = 0, GPT-2's = the last id)."""
    vocab = access.d_vocab or 2
    if access.tokenizer is None:
        return (32, 127) if vocab == 256 else (0, vocab)
    special = set(int(i) for i in (getattr(access.tokenizer, "all_special_ids", None) or []))
    lo, hi = 0, vocab
    while lo in special and lo < hi - 2:
        lo += 1
    while hi - 1 in special and hi - 2 > lo:
        hi -= 1
    return lo, hi


def induction_scores(
    model: ModelLike,
    *,
    tokens: Tensor | None = None,
    targets: Tensor | None = None,
    n_seqs: int = 32,
    half: int | None = None,
    seed: int = 0,
    gradients: bool = False,
    min_match: int = 2,
    batch_size: int = 16,
) -> InductionResult:
    """Induction scores of every head (and, with ``gradients``, where the routing force points).

    Args:
        model: a TransformerLens model.
        tokens: ``[batch, pos]`` ids to measure on (e.g. real code); default: ``n_seqs`` repeated
            random sequences of ``2 * half`` tokens (``half`` default: n_ctx // 2, at most 64),
            drawn from a generator seeded with ``seed`` (printable ASCII 32..126 for a 256-id
            byte vocabulary without tokenizer, else every id but special tokens at either end).
        targets: key index per query (−1: none); default for ``tokens``:
            :func:`induction_targets` with ``min_match``.
        gradients: also run the backward pass (next-token loss) and measure the routing force.
        batch_size: sequences per capture pass.
    """
    access = model_access(model)
    if tokens is None:
        n_ctx = access.n_ctx or 128
        half = half or min(64, n_ctx // 2)
        if 2 * half > n_ctx:
            raise InputError(f"2 * half = {2 * half} exceeds the model's context n_ctx={n_ctx}")
        lo, hi = ordinary_ids(access)
        g = torch.Generator().manual_seed(int(seed))
        tokens, auto = repeated_random_tokens(n_seqs, half, low=lo, high=hi, generator=g)
        targets = auto if targets is None else targets
    tokens = access.as_tokens(tokens)
    targets = induction_targets(tokens, min_match) if targets is None else torch.as_tensor(targets).long()
    if targets.shape != tokens.shape:
        raise InputError(f"targets must have the tokens' shape {tuple(tokens.shape)}, got {tuple(targets.shape)}")
    pos = torch.arange(tokens.shape[1])
    if bool(((targets >= 0) & (targets > pos)).any()):
        raise InputError("an induction target lies after its query (a causal head cannot attend there)")
    acc = InductionAccumulator(gradients=gradients)
    with capture(model, accumulators=[acc], gradients=gradients) as cap:
        for s in range(0, len(tokens), batch_size):
            cap.run(Batch(tokens=tokens[s : s + batch_size], labels={LABEL: targets[s : s + batch_size]}))
    return acc.finalize()
