"""The suite's measurements: one forward-only capture pass per batch feeds every accumulator.

Wind tunnel (:func:`windtunnel_suite`): the sampled sequences go through the model in batches of
:data:`BATCH`; each pass feeds the value-manifold features (one accumulator per representation),
attention entropy at the scored positions, specialization over position buckets (every query
position) and, on the first :data:`QK_SEQS` sequences, query–key alignment. Key orthogonality reads
weights only; the dynamics come from the training record (a monitor state, or a replay of the
weight snapshots: one pass per snapshot, by :func:`bayesmanifold.analyses.replay`).

Text (:func:`text_suite`): random tokens go through the model in one pass that feeds the manifold
(next-token entropy from the same pass's logits), attention entropy at the last token and the
per-sequence specialization. On prompts, Paper III's protocol runs as
:func:`bayesmanifold.analyses.paper3_protocol` does it (one pass per prompt: lengths differ), and
the per-prompt specialization takes one pass over the right-padded prompts.
"""

from dataclasses import replace
from typing import Any

import numpy as np
import torch

from ..analyses import (
    AttentionEntropyAccumulator,
    FeatureAccumulator,
    ManifoldAccumulator,
    QKAlignmentAccumulator,
    SpecializationAccumulator,
    key_orthogonality,
)
from ..analyses.features import next_token_entropy
from ..backends import ModelLike
from ..hooks import Batch, capture, model_access
from .config import SuiteConfig, SuiteResult, Target

__all__ = ["windtunnel_suite", "text_suite"]

BATCH = 128  # sequences per forward pass
QK_SEQS = 64  # query-key alignment is measured on the first 64 sequences
N_GROUPS = 4  # specialization: query positions in 4 equal buckets
MIN_SPEC_LEN = 4  # shorter sequences have fewer positions than buckets


def _position_groups(n_pos: int, n_buckets: int = N_GROUPS) -> torch.Tensor:
    return torch.clamp((torch.arange(n_pos) * n_buckets) // max(n_pos, 1), max=n_buckets - 1)


_SQUARE = ("scores", "pattern")  # sites shaped [batch, head, query, key]; the others are [batch, pos, ...]


def _rows(bundle: Any, rows: slice, n_pos: int | None = None) -> Any:
    """The bundle of sequences ``rows`` (and their first ``n_pos`` positions): every batch-first
    tensor sliced alike, so an accumulator sees a smaller batch of the same pass."""
    q = slice(None) if n_pos is None else slice(0, n_pos)

    def seq(t: Any) -> Any:  # [batch, pos, ...]
        return None if t is None else t[rows][:, q]

    def square(t: Any) -> Any:  # [batch, head, query, key]
        return None if t is None else t[rows][:, :, q, q]

    b = bundle.batch
    batch = Batch(
        tokens=b.tokens[rows, q],
        attention_mask=None if b.attention_mask is None else b.attention_mask[rows, q],
        positions=None if b.positions is None else b.positions[rows, q],
        labels={k: (v[rows, q] if v.dim() > 1 else v[rows]) for k, v in b.labels.items()},
    )
    acts = {k: (square(v) if k in _SQUARE else seq(v)) for k, v in bundle.acts.items()}
    valid = bundle.valid[rows][:, q, q]
    return replace(
        bundle, pattern=square(bundle.pattern), values=seq(bundle.values), grad_z=seq(bundle.grad_z),
        grad_pattern=square(bundle.grad_pattern), grad_scores=square(bundle.grad_scores),
        grad_values=seq(bundle.grad_values), valid=valid, query_valid=seq(bundle.query_valid), batch=batch, acts=acts,
    )


class _FirstSequences:
    """Feeds ``inner`` only the first ``n`` sequences of the stream (counted per layer)."""

    needs_gradients = False

    def __init__(self, inner: Any, n: int) -> None:
        self.inner, self.n = inner, n
        self.sites = tuple(getattr(inner, "sites", ()))
        self._seen: dict[int, int] = {}

    def update(self, bundle: Any) -> None:
        seen = self._seen.get(bundle.layer, 0)
        take = min(self.n - seen, bundle.pattern.shape[0])
        if take > 0:
            self.inner.update(_rows(bundle, slice(0, take)))
            self._seen[bundle.layer] = seen + take

    def finalize(self) -> Any:
        return self.inner.finalize()


class _EveryPosition:
    """Feeds ``inner`` the batch without its scored-position mask (every real query position)."""

    needs_gradients = False

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    def update(self, bundle: Any) -> None:
        self.inner.update(replace(bundle, batch=replace(bundle.batch, positions=None, labels=dict(bundle.batch.labels))))

    def finalize(self) -> Any:
        return self.inner.finalize()


class _PerSequenceSpecialization:
    """Specialization of each sequence on its own (its real positions in 4 buckets), averaged over
    sequences per head; sequences shorter than :data:`MIN_SPEC_LEN` are skipped."""

    needs_gradients = False

    def __init__(self, layers: list[int], n_heads: int, lengths: list[int]) -> None:
        self.lengths = lengths
        self.accs = {i: SpecializationAccumulator(layers, n_heads, N_GROUPS) for i, n in enumerate(lengths) if n >= MIN_SPEC_LEN}

    def update(self, bundle: Any) -> None:
        for i, acc in self.accs.items():
            n = self.lengths[i]
            sub = _rows(bundle, slice(i, i + 1), n)
            acc.update(replace(sub, batch=Batch(tokens=sub.batch.tokens, labels={"group": _position_groups(n)[None]})))

    def finalize(self) -> dict[str, dict[str, float]]:
        results = [acc.finalize().per_head() for acc in self.accs.values()]
        if not results:
            return {}
        return {k: {f: float(np.nanmean([r[k][f] for r in results])) for f in results[0][k]} for k in results[0]}


# ------------------------------------------------------------------------------- wind tunnel
def windtunnel_suite(target: Target, config: SuiteConfig) -> SuiteResult:
    model, task = target.model, target.task
    acc = model_access(model)
    last = acc.n_layers - 1
    batch = task.sample(config.n_seqs, generator=config.seed)
    toks = batch.tokens
    B, P = toks.shape
    qmask = torch.zeros(B, P, dtype=torch.bool)
    qmask[:, batch.positions] = True
    h_bayes = torch.full((B, P), float("nan"), dtype=torch.float64)
    h_bayes[:, batch.positions] = batch.bayes_entropy_bits().to(torch.float64)
    res: dict[str, Any] = {"mode": "windtunnel", "task": task.to_dict(), "n_seqs": int(B)}

    ko = key_orthogonality(model, definition="tokens", token_ids=task.answer_tokens, seed=config.seed)
    ka = key_orthogonality(model, definition="tokens", token_ids=task.answer_tokens, seed=config.seed, absolute=True)
    kc = key_orthogonality(model, definition="columns", seed=config.seed)
    res["key_orthogonality"] = ko.per_layer.tolist()
    res["key_orthogonality_definition"] = "hypothesis-token keys (answer tokens; LN1(W_E) W_K + b_K), mean off-diagonal cosine"
    res["key_orthogonality_gaussian"] = ko.gaussian
    res["key_orthogonality_random_init"] = ko.random_init_per_layer.tolist()
    res["key_orthogonality_abs"] = ka.per_layer.tolist()
    res["key_orthogonality_abs_random_init"] = ka.random_init_per_layer.tolist()
    res["key_orthogonality_abs_gaussian"] = ka.gaussian
    res["key_orthogonality_columns"] = kc.per_layer.tolist()
    res["key_orthogonality_columns_random_init"] = kc.random_init_per_layer.tolist()

    from ..analyses.features import describe_features

    main_kind = config.features or "residual"
    kinds = ["residual", "values_concat"] + ([main_kind] if main_kind not in ("residual", "values_concat") else [])
    features = {
        kind: FeatureAccumulator(kind=kind, layer=last, label="bayes_entropy", pca=ManifoldAccumulator(
            standardize=False, feature_kind=describe_features(model, kind, -1, None), scalar_name="Bayes entropy (bits)"))
        for kind in kinds
    }
    layers = list(range(acc.n_layers))
    ent = AttentionEntropyAccumulator(layers, acc.n_heads)
    spec = SpecializationAccumulator(layers, acc.n_heads, N_GROUPS)
    qk = _FirstSequences(QKAlignmentAccumulator(layers, acc.n_heads), QK_SEQS)
    groups = _position_groups(P)
    with capture(model, accumulators=[*features.values(), ent, _EveryPosition(spec), qk], gradients=False) as cap:
        for s in range(0, B, BATCH):
            n = min(BATCH, B - s)
            cap.run(Batch(tokens=toks[s : s + n], positions=qmask[s : s + n],
                          labels={"bayes_entropy": h_bayes[s : s + n], "group": groups.expand(n, P)}))
    manifolds = {kind: f.finalize() for kind, f in features.items()}
    m = manifolds[main_kind]
    res.update(
        value_pc1=m.pc1_share,
        value_pc12=m.pc12_share,
        participation_ratio=m.participation_ratio,
        spearman_pc1_entropy=m.spearman_pc1,
        r2_pc1_entropy=m.r2_pc1,
        manifold_features=m.feature_kind,
        manifolds={k: v.summary() for k, v in manifolds.items()},
    )
    ent_res = ent.finalize()
    res["attention_entropy"] = ent_res.per_layer.tolist()
    res["attention_entropy_reduction"] = ent_res.reduction
    res["query_key_alignment"] = qk.finalize().per_layer.tolist()
    spec_res = spec.finalize()
    res["specialization"] = spec_res.per_head()
    res["specialization_groups"] = "query position buckets (4 equal buckets over the sequence)"

    dyn = None
    if config.dynamics:
        from .dynamics import training_dynamics

        dyn, source = training_dynamics(target, config, batch.positions)
        if dyn is not None:
            res.update(
                frame_stabilization_step=dyn.frame_stabilization_step,
                precision_stabilization_step=dyn.precision_stabilization_step,
                dissociation_ratio=dyn.dissociation_ratio,
                frame_settling_step=dyn.frame_settling_step,
                precision_settling_step=dyn.precision_settling_step,
                calibration_settling_step=dyn.calibration_settling_step,
                settling_ratio=dyn.settling_ratio,
                dynamics_source=source,
                dynamics=dyn.summary(),
            )
    evals = target.history.get("eval") if isinstance(target.history, dict) else None
    if evals:
        res["final_entropy_mae_bits"] = evals[-1].get("entropy_mae_bits")
    return SuiteResult("windtunnel", res, key_orthogonality=ko, manifold=m, attention_entropy=ent_res,
                       specialization=spec_res, dynamics=dyn)


# -------------------------------------------------------------------------------------- text
COLUMNS_DEFINITION = "W_K columns per head, mean off-diagonal |cos| (Paper III)"


def text_suite(model: ModelLike, config: SuiteConfig) -> SuiteResult:
    acc = model_access(model)
    layers = list(range(acc.n_layers))
    if config.prompts:
        return _prompts_suite(model, config, layers)
    from ..analyses.features import describe_features

    g = torch.Generator().manual_seed(config.seed)
    n_pos = min(32, acc.n_ctx)
    toks = torch.randint(0, acc.d_vocab, (64, n_pos), generator=g)
    ko = key_orthogonality(model, definition="columns", seed=config.seed)
    kind = config.features or "values_concat"
    feats = FeatureAccumulator(kind=kind, layer=layers[-1], output_scalar=next_token_entropy, pca=ManifoldAccumulator(
        standardize=True, feature_kind=describe_features(model, kind, -1, None), scalar_name="next-token entropy"))
    ent = AttentionEntropyAccumulator(layers, acc.n_heads)
    spec = _PerSequenceSpecialization(layers, acc.n_heads, [n_pos] * toks.shape[0])
    last = torch.zeros(toks.shape, dtype=torch.bool)
    last[:, -1] = True
    with capture(model, accumulators=[feats, ent, spec], gradients=False) as cap:
        cap.run(Batch(tokens=toks, positions=last))
    m, ent_res = feats.finalize(), ent.finalize()
    res = {
        "mode": "random-tokens",
        "key_orthogonality": ko.per_layer.tolist(),
        "key_orthogonality_definition": COLUMNS_DEFINITION,
        "key_orthogonality_random_init": ko.random_init_per_layer.tolist(),
        "value_pc1": m.pc1_share,
        "value_pc12": m.pc12_share,
        "participation_ratio": m.participation_ratio,
        "spearman_pc1_entropy": m.spearman_pc1,
        "manifold_features": m.feature_kind,
        "attention_entropy": ent_res.per_layer.tolist(),
        "attention_entropy_reduction": ent_res.reduction,
        "specialization": spec.finalize(),
        "specialization_groups": "query position buckets (4 equal buckets per sequence), averaged over sequences",
    }
    return SuiteResult("random-tokens", res, key_orthogonality=ko, manifold=m, attention_entropy=ent_res)


def _prompts_suite(model: ModelLike, config: SuiteConfig, layers: list[int]) -> SuiteResult:
    from ..analyses import paper3_protocol
    from ..analyses.paper3 import read_prompts, tokenize_prompt

    acc = model_access(model)
    p3 = paper3_protocol(model, config.prompts)
    i = p3.layers.index(p3.best_layer)
    res = {
        "mode": "prompts",
        "key_orthogonality": p3.key_orthogonality.tolist(),
        "key_orthogonality_definition": COLUMNS_DEFINITION,
        "value_pc1": float(p3.pc1[i]),
        "value_pc12": float(p3.pc12[i]),
        "participation_ratio": float(p3.participation_ratio[i]),
        "spearman_pc1_entropy": float(p3.spearman_pc1_entropy[i]),
        "manifold_features": f"standardised concatenated values (hook_v) at the final token, layer {p3.best_layer} (largest PC1+PC2"
        + (f"; {p3.value_manifold_untested})" if p3.value_manifold_untested else " among full-rank layers)"),
        "value_manifold_untested": p3.value_manifold_untested,
        "attention_entropy": p3.attention_entropy.tolist(),
        "attention_entropy_reduction": p3.attention_entropy_reduction,
        "paper3": p3.summary(),
        "paper3_per_layer": p3.to_dataframe().to_dict(orient="list"),
    }
    seqs = [tokenize_prompt(model, p)[0] for p in read_prompts(config.prompts)]
    lengths = [int(s.shape[0]) for s in seqs]  # paper3_protocol checked them against n_ctx
    toks = torch.zeros(len(seqs), max(lengths), dtype=torch.long)
    mask = torch.zeros_like(toks)
    for j, s in enumerate(seqs):  # right padding: a causal model's real positions never see it
        toks[j, : lengths[j]], mask[j, : lengths[j]] = s, 1
    spec = _PerSequenceSpecialization(layers, acc.n_heads, lengths)
    if spec.accs:
        with capture(model, accumulators=[spec], gradients=False) as cap:
            cap.run(Batch(tokens=toks, attention_mask=mask))
    res["specialization"] = spec.finalize()
    res["specialization_groups"] = "query position buckets (4 equal buckets per sequence), averaged over sequences"
    return SuiteResult("prompts", res, paper3=p3)
