"""Paper III's in-context Bayesian updating test ("SULA"): does a pretrained model update on noisy
labels as an exact Bayesian observer would, and does its value manifold's first axis track it?

The task (Paper III, arXiv 2512.23752, §5 of PAPERS.md). Each prompt holds k labelled examples
and a query, ``"x_1: L_1, x_2: L_2, …, x_k: L_k. q:"`` (``"q:"`` for k = 0; the authors' format).
Per prompt a pair of candidate labels (A, B) is drawn from nonsense words (default dax, lug, mip,
zorb, wug, kep, tuv, gax) and a latent label y ∈ {A, B} with probability 1/2 each; each example's
label equals y with probability 1 − ε (ε = 0.1), else it is the other one. The carriers x_i and
the query q are real words, distinct within a prompt (the Bayes model ignores them; here they
cannot be copied from an identical example).

The analytic posterior. With uniform prior and n_A, n_B examples labelled A, B:
P(y = A | labels) = (1−ε)^{n_A} ε^{n_B} / ((1−ε)^{n_A} ε^{n_B} + ε^{n_A} (1−ε)^{n_B})
= σ((n_A − n_B) ln((1−ε)/ε)), and its entropy in bits depends on |n_A − n_B| only
(1 bit at 0; 0.469 at 1; 0.0950 at 2 for ε = 0.1).

The model's posterior. The default labels are not single tokens in SmolLM2's tokenizer (none of
the eight is: " dax" is " d" + "ax"), so each label is scored as a whole word: the teacher-forced
log-probability of all its tokens after the query (``"… q:"`` followed by ``" L"``), i.e. one
forward pass of ``prompt + " A"`` and one of ``prompt + " B"`` (batched, right-padded). The
posterior is the two probabilities renormalised, p_A = σ(log P(A) − log P(B)); its entropy in
bits is compared with the analytic one: the entropy MAE (mean over prompts of |H_model −
H_Bayes|; Paper III: 0.44 Pythia-410M, 0.36 Llama-3.2-1B, 0.31 Phi-2). For a single-token label
this is exactly the authors' renormalised next-token softmax.

The manifold. As in Paper III's pipeline (``analyze_icl_sula.py``) and :mod:`.paper3`: at the
query's last token (the ``":"``), the final layer's values (per kv head, concatenated),
standardised per coordinate, PCA across the prompts of a condition; PC1's sign is chosen so that
it correlates positively with the analytic entropy. Reported: ρ(k, mean PC1) over the k values and
per prompt, and |ρ(PC1, analytic entropy)| (Spearman; Pearson, the authors' script's, beside it;
Paper III: 0.65–0.80). Because the analytic entropy falls with k, an axis that only counted the
examples would correlate with it too: the result also gives |ρ(k, analytic entropy)| (what k
alone achieves) and ρ(PC1, analytic entropy) within each k (where only the evidence varies).

Controls (``controls=True``), on the same carriers, pairs and latent labels:

- ``shuffled``: every example label drawn uniformly from {A, B}, independent of y. The exact
  posterior is then 1/2 (1 bit) at every k; the result also gives the MAE against the noisy-label
  observer's posterior from the counts (the evidence as presented), which the model cannot tell
  apart from real evidence.
- ``lexical_remap``: every label word replaced through a fixed bijection by another nonsense word
  (default blick, fep, toma, snerg, vorp, quib, zell, driv): Bayes is unchanged, so a model that
  reads the evidence rather than the words keeps its entropies (the mean |ΔH| to the main
  condition, prompt by prompt).

A shared PCA over all conditions gives the PC1 trajectories by k on one axis (as the authors'
``visualize_sula_controls.py`` does). Everything touching the model runs through capture
(forward-only: values at the query position, logits for the label scores).
"""

import time
import warnings
from dataclasses import asdict, dataclass, fields
from typing import Any

import numpy as np
import torch

from ..backends import ModelLike, model_access
from ..backends.batch import Batch
from ..errors import ConfigError, InputError
from ..hooks.bundle import OutputBundle
from ..hooks.capture import capture
from .features import FeatureAccumulator, describe_features
from .manifold import ManifoldAccumulator, RankLimitedWarning
from .sula_result import (
    PAPER3_SULA,
    SulaCondition,
    SulaResult,
    analytic_posterior,
    binary_entropy_bits,
)

__all__ = ["SulaConfig", "SulaResult", "SulaCondition", "sula_test", "sula_prompts", "analytic_posterior",
           "binary_entropy_bits", "PAPER3_SULA", "LABELS", "REMAP_LABELS", "WORDS"]

#: Paper III's candidate label words (the authors' ``generate_sula_dataset.py``)
LABELS = ("dax", "lug", "mip", "zorb", "wug", "kep", "tuv", "gax")
#: other nonsense words, for the lexical-remap control (ours)
REMAP_LABELS = ("blick", "fep", "toma", "snerg", "vorp", "quib", "zell", "driv")
#: carriers x_i and queries: common concrete nouns (ours; the authors drew from sentiment words)
WORDS = (
    "apple", "river", "chair", "garden", "window", "bottle", "pencil", "mountain", "carpet", "candle",
    "bridge", "basket", "forest", "hammer", "jacket", "kettle", "ladder", "mirror", "needle", "orange",
    "pillow", "rabbit", "saddle", "table", "tunnel", "violin", "wagon", "anchor", "barrel", "cabin",
    "desert", "engine", "feather", "guitar", "harbor", "island", "lemon", "marble", "jungle", "onion",
    "pepper", "rocket", "silver", "tomato", "umbrella", "valley", "walnut", "blanket", "button", "castle",
)
CONDITIONS = ("main", "shuffled", "lexical_remap")
_BAD_CHARS = set(":,.") | {" ", "\t", "\n"}


def _words(value: Any, what: str) -> tuple[str, ...]:
    if isinstance(value, str) or not hasattr(value, "__iter__"):
        raise ConfigError(f"{what} must be a sequence of words, got {type(value).__name__}")
    out = tuple(value)
    for w in out:
        if not isinstance(w, str) or not w or set(w) & _BAD_CHARS:
            raise ConfigError(f"{what}: {w!r} is not a word; accepted: non-empty strings without spaces, ':', ',' or '.'")
    if len(set(out)) != len(out):
        raise ConfigError(f"{what} repeat a word: {sorted(w for w in set(out) if out.count(w) > 1)}")
    return out


@dataclass(frozen=True, kw_only=True)
class SulaConfig:
    """What :func:`sula_test` runs (validated on construction).

    Attributes:
        ks: the numbers of in-context examples (each ≥ 0, distinct).
        n_per_k: prompts per k (≥ 2; Paper III: 50).
        noise: ε, the probability an example's label is the other one (0 < ε < 0.5).
        labels: candidate label words (≥ 2); each prompt draws an ordered pair.
        remap_labels: the lexical-remap control's words (as many as ``labels``, none of them).
        words: carriers and queries (at least max(ks) + 1, distinct within a prompt).
        controls: also run the shuffled-labels and lexical-remap controls (3× the work).
        layer: the layer whose values give PC1 (negative counts from the end; Paper III: the last).
        seed: seed of the prompts (a ``numpy.random.default_rng``; global RNGs untouched).
        batch_tokens: padded tokens per forward pass (memory: the logits are batch × pos × vocab).
    """

    ks: tuple[int, ...] = (0, 1, 2, 4, 8)
    n_per_k: int = 50
    noise: float = 0.1
    labels: tuple[str, ...] = LABELS
    remap_labels: tuple[str, ...] = REMAP_LABELS
    words: tuple[str, ...] = WORDS
    controls: bool = False
    layer: int = -1
    seed: int = 0
    batch_tokens: int = 1024

    def __post_init__(self) -> None:
        ks = self.ks if not isinstance(self.ks, int) else (self.ks,)
        if isinstance(ks, str) or not hasattr(ks, "__iter__") or not len(ks):
            raise ConfigError(f"ks must be a non-empty sequence of integers >= 0, got {self.ks!r}")
        if any(not isinstance(k, int | np.integer) or isinstance(k, bool) or k < 0 for k in ks):
            raise ConfigError(f"ks must be integers >= 0 (the number of examples), got {list(ks)}")
        ks = tuple(int(k) for k in ks)
        if len(set(ks)) != len(ks):
            raise ConfigError(f"ks repeat a value: {list(ks)}")
        object.__setattr__(self, "ks", ks)
        if isinstance(self.n_per_k, bool) or not isinstance(self.n_per_k, int | np.integer) or self.n_per_k < 2:
            raise ConfigError(f"n_per_k must be an integer >= 2 (prompts per k), got {self.n_per_k!r}")
        if not isinstance(self.noise, int | float) or not 0 < float(self.noise) < 0.5:
            raise ConfigError(f"noise must lie in (0, 0.5) (the chance an example's label is flipped), got {self.noise!r}")
        labels = _words(self.labels, "labels")
        if len(labels) < 2:
            raise ConfigError(f"labels: at least 2 label words are needed (a pair per prompt), got {list(labels)}")
        remap = _words(self.remap_labels, "remap_labels")
        if len(remap) != len(labels) or set(remap) & set(labels):
            raise ConfigError(f"remap_labels must be {len(labels)} words (one per label) that are not labels, got {list(remap)}")
        words = _words(self.words, "words")
        if len(words) < max(ks) + 1:
            raise ConfigError(f"words: k = {max(ks)} needs at least {max(ks) + 1} distinct carrier words, got {len(words)}")
        if set(words) & (set(labels) | set(remap)):
            raise ConfigError(f"words and labels overlap: {sorted(set(words) & (set(labels) | set(remap)))}")
        if isinstance(self.layer, bool) or not isinstance(self.layer, int | np.integer):
            raise ConfigError(f"layer must be an integer, got {self.layer!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int | np.integer) or self.seed < 0:
            raise ConfigError(f"seed must be an integer >= 0, got {self.seed!r}")
        if isinstance(self.batch_tokens, bool) or not isinstance(self.batch_tokens, int | np.integer) or self.batch_tokens < 1:
            raise ConfigError(f"batch_tokens must be an integer >= 1, got {self.batch_tokens!r}")
        for name, v in (("labels", labels), ("remap_labels", remap), ("words", words)):
            object.__setattr__(self, name, v)
        for name in ("n_per_k", "layer", "seed", "batch_tokens"):
            object.__setattr__(self, name, int(getattr(self, name)))
        object.__setattr__(self, "noise", float(self.noise))
        object.__setattr__(self, "controls", bool(self.controls))

    @classmethod
    def quick(cls, **overrides: Any) -> "SulaConfig":
        """A reduced run for demos: 10 prompts per k, no controls (override anything)."""
        return cls(**{"n_per_k": 10, **overrides})

    @property
    def conditions(self) -> tuple[str, ...]:
        return CONDITIONS if self.controls else CONDITIONS[:1]

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "SulaConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ConfigError(f"unknown SulaConfig fields {sorted(unknown)}; accepted: {sorted(known)}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


@dataclass(frozen=True, eq=False)
class SulaPrompts:
    """One condition's prompts: texts, and per prompt k, the pair (indices into ``vocab``), the
    latent label (0: the pair's first, 1: its second) and the counts of each label shown."""

    condition: str
    texts: list[str]
    k: np.ndarray
    pair: np.ndarray
    latent: np.ndarray
    n_a: np.ndarray
    n_b: np.ndarray
    vocab: tuple[str, ...]
    informative: bool


def sula_prompts(config: SulaConfig) -> dict[str, SulaPrompts]:
    """The prompts of every condition of ``config`` (deterministic in ``config.seed``)."""
    rng, rng_shuffle = np.random.default_rng(config.seed), np.random.default_rng([config.seed, 1])
    n_words = len(config.words)
    rows = []  # (k, word indices, pair, latent, labels shown (0/1 of the pair), shuffled labels shown)
    for k in config.ks:
        for _ in range(config.n_per_k):
            words = rng.choice(n_words, size=k + 1, replace=False)
            pair = rng.choice(len(config.labels), size=2, replace=False)
            latent = int(rng.integers(2))
            flips = rng.random(k) < config.noise
            shown = np.where(flips, 1 - latent, latent)
            rows.append((k, words, pair, latent, shown, rng_shuffle.integers(2, size=k)))
    out = {}
    for cond in config.conditions:
        vocab = config.remap_labels if cond == "lexical_remap" else config.labels
        texts, n_a = [], []
        for k, words, pair, _, shown, shuffled in rows:
            labs = shuffled if cond == "shuffled" else shown
            ex = ", ".join(f"{config.words[w]}: {vocab[pair[s]]}" for w, s in zip(words[:k], labs))
            texts.append(f"{ex}. {config.words[words[k]]}:" if k else f"{config.words[words[k]]}:")
            n_a.append(int(np.sum(labs == 0)))
        k_arr = np.array([r[0] for r in rows])
        n_a_arr = np.array(n_a)
        out[cond] = SulaPrompts(condition=cond, texts=texts, k=k_arr, pair=np.array([r[2] for r in rows]),
                                latent=np.array([r[3] for r in rows]), n_a=n_a_arr, n_b=k_arr - n_a_arr,
                                vocab=vocab, informative=cond != "shuffled")
    return out


class _LabelScorer:
    """Capture accumulator: per row, the summed log-probability of its target tokens (the label's).

    Reads ``batch.labels["target"]`` ([batch, pos]: the token predicted at each position, −1 where
    nothing is scored) and ``batch.labels["row"]`` ([batch]: the sequence's id)."""

    needs_gradients = False

    def __init__(self) -> None:
        self.logp: dict[int, float] = {}

    def update(self, bundle: Any) -> None:
        return None

    def update_output(self, out: OutputBundle) -> None:
        tgt = out.batch.label("target").to(out.logits.device)
        mask = tgt >= 0
        lp = torch.log_softmax(out.logits[mask].double(), -1).gather(1, tgt[mask][:, None])[:, 0]
        rows = torch.arange(tgt.shape[0], device=tgt.device)[:, None].expand_as(tgt)[mask]
        sums = torch.zeros(tgt.shape[0], dtype=torch.float64, device=lp.device).index_add_(0, rows, lp)
        for rid, s in zip(out.batch.label("row").tolist(), sums.tolist()):
            self.logp[int(rid)] = s

    def merge(self, other: "_LabelScorer") -> "_LabelScorer":
        self.logp.update(other.logp)
        return self

    def finalize(self) -> dict[int, float]:
        return dict(self.logp)


def _zero_objective(logits: torch.Tensor, inputs: Any) -> torch.Tensor:
    return logits.new_zeros(())  # no loss is needed: the scorer reads the logits


def _label_ids(access: Any, word: str) -> list[int]:
    """The tokens of ``" word"`` after a query ``"…:"``: ``encode("x: word")`` minus ``encode("x:")``."""
    base, full = access.encode("x:").tolist(), access.encode(f"x: {word}").tolist()
    if full[: len(base)] != base:
        raise InputError(f"label {word!r}: the tokenizer merges its first token with the ':' before it, so it cannot be "
                         "scored after the query; choose another label word")
    ids = full[len(base):]
    if not ids:
        raise InputError(f"label {word!r} encodes to zero tokens after a query; choose another label word")
    return ids


def sula_test(model: ModelLike, config: SulaConfig | None = None) -> SulaResult:
    """Run the in-context Bayesian updating test on ``model`` (see the module docstring).

    Raises:
        ConfigError: ``config`` is not a :class:`SulaConfig`.
        InputError: the model cannot read text (no tokenizer and no byte vocabulary), a label
            encodes to zero tokens, or the longest prompt exceeds the model's context.

    Example:
        >>> res = sula_test(model, SulaConfig(n_per_k=50, controls=True))  # doctest: +SKIP
        >>> res.summary()["entropy_mae_bits"], res.plot()  # doctest: +SKIP
    """
    config = SulaConfig() if config is None else config
    if not isinstance(config, SulaConfig):
        raise ConfigError(f"config must be a SulaConfig, got {type(config).__name__}")
    access = model_access(model)
    if access.text_encoding is None:
        raise InputError(f"the SULA test reads text prompts, but the model has no tokenizer (and its vocabulary of "
                         f"{access.d_vocab} does not cover the 256 byte values); give a model with a tokenizer")
    layer = access.norm_layers(config.layer)[0]
    t0 = time.perf_counter()
    sets = sula_prompts(config)
    vocab = dict.fromkeys(w for ps in sets.values() for w in ps.vocab)
    label_ids = {w: _label_ids(access, w) for w in vocab}
    seqs = []  # (row id, condition index, prompt index, candidate, token ids, prompt length)
    for c, ps in enumerate(sets.values()):
        for i, text in enumerate(ps.texts):
            p_ids = access.encode(text).tolist()
            for cand in (0, 1):
                seqs.append((len(seqs), c, i, cand, p_ids + label_ids[ps.vocab[ps.pair[i, cand]]], len(p_ids)))
    longest = max(len(s[4]) for s in seqs)
    if access.n_ctx is not None and longest > access.n_ctx:
        raise InputError(f"the longest SULA prompt with its label has {longest} tokens, more than the model's context "
                         f"n_ctx={access.n_ctx}; use smaller ks")
    pad = getattr(access.tokenizer, "pad_token_id", None) if access.tokenizer is not None else None
    pad = 0 if pad is None else int(pad)
    feats = FeatureAccumulator(kind="values_concat", layer=layer, dtype=torch.float64)
    scorer = _LabelScorer()
    feature_rows: list[tuple[int, int]] = []
    with capture(model, accumulators=[feats, scorer], layers=[layer], gradients=False) as cap:
        for chunk in _chunks(sorted(seqs, key=lambda s: len(s[4])), config.batch_tokens):
            n = max(len(s[4]) for s in chunk)
            tokens = torch.full((len(chunk), n), pad, dtype=torch.long)
            mask = torch.zeros((len(chunk), n), dtype=torch.long)
            target = torch.full((len(chunk), n), -1, dtype=torch.long)
            positions = torch.zeros((len(chunk), n), dtype=torch.bool)
            for r, (_, c, i, cand, ids, n_prompt) in enumerate(chunk):
                tokens[r, : len(ids)] = torch.tensor(ids)
                mask[r, : len(ids)] = 1
                target[r, n_prompt - 1: len(ids) - 1] = torch.tensor(ids[n_prompt:])
                if cand == 0:  # the query's representation is the same in both rows: read it once
                    positions[r, n_prompt - 1] = True
                    feature_rows.append((c, i))
            rows = torch.tensor([s[0] for s in chunk])
            cap.run(Batch(tokens=tokens, attention_mask=mask, positions=positions, labels={"target": target, "row": rows}),
                    objective=_zero_objective)
    logp = scorer.finalize()
    X = feats.features.numpy()
    where = {cr: j for j, cr in enumerate(feature_rows)}
    lp = np.array([logp[s[0]] for s in seqs]).reshape(len(sets), -1, 2)
    conds, pcas = {}, {}
    shared = ManifoldAccumulator(standardize=True, feature_kind="shared", scalar_name="analytic entropy (bits)")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", RankLimitedWarning)
        for c, (name, ps) in enumerate(sets.items()):
            Xc = X[[where[(c, i)] for i in range(len(ps.texts))]]
            evidence_h = binary_entropy_bits(analytic_posterior(ps.n_a, ps.n_b, config.noise))
            truth_h = evidence_h if ps.informative else np.ones(len(ps.texts))
            acc = ManifoldAccumulator(standardize=True, feature_kind=describe_features(model, "values_concat", layer, None),
                                      scalar_name="analytic entropy (bits)")
            acc.update(Xc, truth_h)
            shared.update(Xc, truth_h)
            pcas[name] = acc.finalize()
            conds[name] = SulaCondition.build(name, ps, lp[c, :, 0], lp[c, :, 1], truth_h, evidence_h, config.noise,
                                              pcas[name])
        shared_res = shared.finalize()
    rank_limited = any(issubclass(w.category, RankLimitedWarning) for w in caught)
    for w in caught:
        if not issubclass(w.category, RankLimitedWarning):
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    if rank_limited:
        d = pcas["main"].n_features
        warnings.warn(f"SULA: {len(sets['main'].texts)} prompts per condition for {d} value features: the PCA is "
                      f"rank-limited and PC1's share is inflated (at least {d + 1} prompts are needed for a full-rank "
                      "covariance); the PC1 scores and their correlations remain defined", RankLimitedWarning, stacklevel=2)
    return SulaResult.build(config=config, conditions=conds, shared_scores=shared_res.scores[:, 0], layer=layer,
                            feature_kind=pcas["main"].feature_kind, n_features=pcas["main"].n_features,
                            label_tokens={w: len(v) for w, v in label_ids.items()}, rank_limited=rank_limited,
                            seconds=time.perf_counter() - t0)


def _chunks(seqs: list, budget: int, max_waste: float = 0.15) -> list[list]:
    """Consecutive runs of (length-sorted) sequences: at most ``budget`` padded tokens each, and at
    most ``max_waste`` of them padding (padding is compute: the passes are the cost)."""
    out, cur, real = [], [], 0
    for s in seqs:
        n = len(s[4])
        size = (len(cur) + 1) * n
        if cur and (size > budget or size - real - n > max_waste * size):
            out.append(cur)
            cur, real = [], 0
        cur.append(s)
        real += n
    if cur:
        out.append(cur)
    return out
