"""Attention geometry: orthogonal hypothesis keys, query–key alignment, attention focusing.

Paper I (arXiv 2512.22471) reports, on the Bayesian wind tunnels, that the keys of the hypothesis
tokens become nearly orthogonal in layer 0 (mean off-diagonal cosine 0.09–0.12, against 0.40–0.45
for a random model), that query–key alignment sharpens with depth, and that attention entropy at
the query position falls 85–90% from the first to the last layer. Paper III (arXiv 2512.23752)
measures key orthogonality as the mean off-diagonal |cos| between the d_k columns of W_K per head
and the attention-entropy reduction in pretrained LLMs.

Definitions used here (all per layer and head, then summarised per layer):

- **Token-key orthogonality** (Paper I): for hypothesis tokens t_1..t_n,
  k_i = LN1_l(W_E[t_i]) W_K^{l,h} + b_K^{l,h}; the rows are ℓ2-normalised and the statistic is the
  mean *signed* off-diagonal cosine. The layer's first normalisation (``blocks[l].ln1``) is
  applied to the bare token embedding (no positional embedding, which would add the same shift to
  every key); for layers > 0 this is the embedding seen directly by that layer's keys, not the
  actual residual stream. ``include_bias=False`` leaves out b_K.
- **Column orthogonality** (Paper III): the d_head columns of W_K^{l,h} (vectors in d_model),
  ℓ2-normalised, mean off-diagonal |cos|.
- Under GQA the key weights are per kv head, so both statistics are reported per kv head.
- Baselines: the same statistic for i.i.d. Gaussian vectors of the same shape (seeded), and for a
  freshly initialised model of the same config (seeded; the global RNG is left untouched).
- **Query–key alignment**: at the chosen query positions, cos(q_i, k_{j*}) with j* = argmax_j α_ij,
  minus the mean cos(q_i, k_j) over the other valid keys j ("alignment margin"); both reported
  (rotary models: the rotated q and k).
- **Attention entropy**: H_i = −Σ_j α_ij ln α_ij per head at the chosen query positions; averaged
  over queries, then over heads (mean of entropies, never the entropy of the mean pattern).
  Reduction = (H̄_first − H̄_last) / H̄_first.
- **Head ablation importance**: the change of a metric (default: mean next-token loss) when one
  head's output (hook_z) is replaced by zero or by its mean over the batch and positions.
"""

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from jaxtyping import Bool, Float, Int
from torch import Tensor

from ..errors import InputError
from .manifold import (
    Positions,
    _as_tokens,
    _forward_capture,
    _hook_model_check,
    _n_kv_heads,
    _norm_heads,
    _norm_layers,
    _position_mask,
    _scoped_hooks,
)

__all__ = [
    "mean_offdiag_cosine",
    "KeyOrthogonalityResult",
    "key_orthogonality",
    "AttentionEntropyAccumulator",
    "AttentionEntropyResult",
    "attention_entropy",
    "pattern_entropy",
    "QKAlignmentResult",
    "query_key_alignment",
    "HeadAblationResult",
    "head_ablation",
    "fresh_model",
]


# ---------------------------------------------------------------------------------------------
# key orthogonality


def mean_offdiag_cosine(vectors: Float[Tensor, "... n d"], absolute: bool = False) -> Float[Tensor, "..."]:
    """Mean off-diagonal cosine (or |cosine|) between the n rows of each [..., n, d] block.

    An orthonormal set gives 0, n identical vectors give 1. Needs n ≥ 2.
    """
    v = vectors.to(torch.float64)
    n = v.shape[-2]
    if n < 2:
        raise InputError(f"need at least 2 vectors for an off-diagonal mean, got {n}")
    vn = F.normalize(v, dim=-1, eps=1e-30)
    c = vn @ vn.transpose(-1, -2)
    if absolute:
        c = c.abs()
    off = c.sum((-1, -2)) - torch.diagonal(c, dim1=-2, dim2=-1).sum(-1)
    return off / (n * (n - 1))


def fresh_model(model: Any, seed: int = 0) -> Any:
    """A newly initialised HookedTransformer with ``model``'s config (seeded, global RNG untouched)."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    d = model.cfg.to_dict()
    d.update(seed=None, init_weights=True, device="cpu")
    cfg = HookedTransformerConfig.from_dict(d)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        fresh = HookedTransformer(cfg)
    return fresh


def _key_weights(model: Any, layer: int) -> tuple[Tensor, Tensor | None]:
    """W_K [n_kv, d_model, d_head] and b_K [n_kv, d_head] (unexpanded under GQA)."""
    attn = model.blocks[layer].attn
    W = getattr(attn, "_W_K", None)
    b = getattr(attn, "_b_K", None)
    if W is None:
        W, b = attn.W_K, getattr(attn, "b_K", None)
    return W.detach(), (None if b is None else b.detach())


def _token_keys(model: Any, layer: int, token_ids: Tensor, include_bias: bool) -> Tensor:
    """Keys [n_kv, n_tokens, d_head] of the bare token embeddings through ln1 of ``layer``."""
    W, b = _key_weights(model, layer)
    with torch.no_grad():
        emb = model.W_E.detach()[token_ids.to(model.W_E.device)]
        x = emb.unsqueeze(0)
        ln = getattr(model.blocks[layer], "ln1", None)
        if ln is not None and not isinstance(ln, torch.nn.Identity):
            x = ln(x)
        x = x[0].to(W.dtype)
        k = torch.einsum("nd,hde->hne", x, W)
        if include_bias and b is not None:
            k = k + b[:, None, :]
    return k.to(torch.float64).cpu()


@dataclass(frozen=True, eq=False)
class KeyOrthogonalityResult:
    """Key orthogonality per layer and (kv) head, with baselines.

    Attributes:
        definition: "tokens" (Paper I: mean signed off-diagonal cosine of hypothesis-token keys)
            or "columns" (Paper III: mean off-diagonal |cos| of the d_head columns of W_K).
        per_head: [n_layers_selected, n_kv_heads] statistic.
        layers: the layer indices of the rows.
        gaussian: the statistic for i.i.d. Gaussian vectors of the same shape (mean of draws).
        random_init: [n_layers_selected, n_kv_heads] for a fresh model of the same config, or None.
    """

    definition: str
    layers: list[int]
    per_head: np.ndarray
    gaussian: float
    random_init: np.ndarray | None = None

    @property
    def per_layer(self) -> np.ndarray:
        """Mean over heads, one value per selected layer."""
        return self.per_head.mean(1)

    @property
    def random_init_per_layer(self) -> np.ndarray | None:
        return None if self.random_init is None else self.random_init.mean(1)

    def to_dataframe(self):
        import pandas as pd

        rows = []
        for i, layer in enumerate(self.layers):
            for h in range(self.per_head.shape[1]):
                rows.append(
                    {
                        "layer": layer,
                        "head": h,
                        "definition": self.definition,
                        "key_orthogonality": float(self.per_head[i, h]),
                        "gaussian_baseline": self.gaussian,
                        "random_init_baseline": None if self.random_init is None else float(self.random_init[i, h]),
                    }
                )
        return pd.DataFrame(rows)

    def plot(self, ax=None):
        import matplotlib.pyplot as plt

        if ax is None:
            _, ax = plt.subplots(figsize=(5, 3.5))
        ax.plot(self.layers, self.per_layer, "o-", label="trained")
        if self.random_init is not None:
            ax.plot(self.layers, self.random_init_per_layer, "s--", label="random init")
        ax.axhline(self.gaussian, color="gray", ls=":", label="Gaussian")
        ax.set_xlabel("layer")
        ax.set_ylabel("mean off-diagonal " + ("cos" if self.definition == "tokens" else "|cos|"))
        ax.set_title(f"key orthogonality ({self.definition})", fontsize=9)
        ax.legend(fontsize=8)
        return ax


def _orth_stats(model: Any, layers: list[int], definition: str, token_ids: Tensor | None, include_bias: bool, absolute: bool) -> np.ndarray:
    rows = []
    for layer in layers:
        if definition == "tokens":
            k = _token_keys(model, layer, token_ids, include_bias)  # [kv, n, d_head]
            rows.append(mean_offdiag_cosine(k, absolute=absolute).numpy())
        else:
            W, _ = _key_weights(model, layer)  # [kv, d_model, d_head]
            rows.append(mean_offdiag_cosine(W.transpose(1, 2).to(torch.float64).cpu(), absolute=absolute).numpy())
    return np.stack(rows)


def key_orthogonality(
    model: Any,
    *,
    definition: Literal["tokens", "columns"] = "tokens",
    token_ids: Sequence[int] | Int[Tensor, " n"] | None = None,
    layers: Iterable[int] | int | None = None,
    include_bias: bool = True,
    random_init_baseline: bool = True,
    seed: int = 0,
    n_gaussian_draws: int = 8,
    absolute: bool | None = None,
) -> KeyOrthogonalityResult:
    """Key orthogonality (see the module docstring for both definitions) with baselines.

    Args:
        model: a HookedTransformer.
        definition: "tokens" (hypothesis-token keys; needs ``token_ids``) or "columns" (W_K columns).
        token_ids: the hypothesis tokens (e.g. the V key tokens of the bijection task).
        layers: which layers (None: all).
        include_bias: add b_K to the token keys.
        random_init_baseline: also measure a fresh model of the same config (seeded).
        seed: seed of both baselines.
        n_gaussian_draws: Gaussian draws averaged for the Gaussian baseline.
        absolute: average |cos| instead of cos (default: False for "tokens", True for "columns",
            as in Papers I and III).

    Example:
        >>> key_orthogonality(model, token_ids=range(20), layers=0).per_layer  # doctest: +SKIP
    """
    _hook_model_check(model)
    layer_list = _norm_layers(model, layers)
    if definition not in ("tokens", "columns"):
        raise InputError(f"definition must be 'tokens' or 'columns', got {definition!r}")
    tok = None
    if definition == "tokens":
        if token_ids is None:
            raise InputError("definition='tokens' needs token_ids (the hypothesis tokens)")
        tok = torch.as_tensor(list(token_ids) if not isinstance(token_ids, Tensor) else token_ids).long().reshape(-1)
        if tok.numel() < 2:
            raise InputError(f"need at least 2 hypothesis tokens, got {tok.numel()}")
        if int(tok.min()) < 0 or int(tok.max()) >= model.cfg.d_vocab:
            raise InputError(f"token_ids must lie in 0..{model.cfg.d_vocab - 1}")
    absolute = (definition == "columns") if absolute is None else bool(absolute)
    per_head = _orth_stats(model, layer_list, definition, tok, include_bias, absolute)
    gen = torch.Generator().manual_seed(seed)
    if definition == "tokens":
        shape = (n_gaussian_draws, tok.numel(), model.cfg.d_head)
        gauss = float(mean_offdiag_cosine(torch.randn(shape, generator=gen, dtype=torch.float64), absolute=absolute).mean())
    else:
        shape = (n_gaussian_draws, model.cfg.d_head, model.cfg.d_model)
        gauss = float(mean_offdiag_cosine(torch.randn(shape, generator=gen, dtype=torch.float64), absolute=absolute).mean())
    rnd = None
    if random_init_baseline:
        fresh = fresh_model(model, seed=seed)
        rnd = _orth_stats(fresh, layer_list, definition, tok, include_bias, absolute)
        del fresh
    return KeyOrthogonalityResult(definition=definition, layers=layer_list, per_head=per_head, gaussian=gauss, random_init=rnd)


# ---------------------------------------------------------------------------------------------
# attention entropy


def pattern_entropy(pattern: Float[Tensor, "... key_pos"]) -> Float[Tensor, "..."]:
    """Shannon entropy (nats) of attention rows; 0·log 0 = 0. Uniform over n keys gives ln n."""
    p = pattern.to(torch.float64)
    return -(torch.where(p > 0, p * torch.log(p.clamp_min(1e-300)), torch.zeros_like(p))).sum(-1)


@dataclass(frozen=True, eq=False)
class AttentionEntropyResult:
    """Mean attention entropy per layer and head at the chosen query positions (nats).

    Attributes:
        per_head: [n_layers_selected, n_heads] mean over the selected queries.
        per_layer: mean over heads of per_head (entropy first, then the mean: Jensen-safe).
        reduction: (per_layer[0] − per_layer[-1]) / per_layer[0] (first vs last selected layer).
        n_queries: number of query rows averaged.
    """

    layers: list[int]
    per_head: np.ndarray
    n_queries: int

    @property
    def per_layer(self) -> np.ndarray:
        return self.per_head.mean(1)

    @property
    def reduction(self) -> float:
        first, last = float(self.per_layer[0]), float(self.per_layer[-1])
        return float("nan") if first <= 0 else (first - last) / first

    def to_dataframe(self):
        import pandas as pd

        return pd.DataFrame(
            [
                {"layer": layer, "head": h, "attention_entropy": float(self.per_head[i, h])}
                for i, layer in enumerate(self.layers)
                for h in range(self.per_head.shape[1])
            ]
        )

    def plot(self, ax=None):
        import matplotlib.pyplot as plt

        if ax is None:
            _, ax = plt.subplots(figsize=(5, 3.5))
        for h in range(self.per_head.shape[1]):
            ax.plot(self.layers, self.per_head[:, h], color="gray", alpha=0.3, lw=0.8)
        ax.plot(self.layers, self.per_layer, "o-", color="C0", label="mean over heads")
        ax.set_xlabel("layer")
        ax.set_ylabel("attention entropy (nats)")
        ax.set_title(f"attention focusing: {100 * self.reduction:.0f}% reduction first→last", fontsize=9)
        ax.legend(fontsize=8)
        return ax


class AttentionEntropyAccumulator:
    """Sums of per-row attention entropy per (layer, head); mergeable.

    ``update(layer, pattern, query_mask)`` with pattern [batch, head, query, key] and
    query_mask Bool[batch, query] selecting the rows to average.
    """

    def __init__(self, layers: Sequence[int], n_heads: int) -> None:
        self.layers = list(layers)
        self._row = {layer: i for i, layer in enumerate(self.layers)}
        self.sums = np.zeros((len(self.layers), n_heads))
        self.counts = np.zeros(len(self.layers))

    def update(self, layer: int, pattern: Float[Tensor, "batch head query_pos key_pos"], query_mask: Bool[Tensor, "batch query_pos"]) -> None:
        if layer not in self._row:
            raise InputError(f"layer {layer} not among the accumulator's layers {self.layers}")
        if pattern.dim() != 4 or tuple(query_mask.shape) != (pattern.shape[0], pattern.shape[2]):
            raise InputError(f"pattern must be [batch, head, query, key] and query_mask [batch, query]; got {tuple(pattern.shape)} and {tuple(query_mask.shape)}")
        h = pattern_entropy(pattern)  # [batch, head, query]
        m = query_mask.to(h.device)
        sel = h.permute(0, 2, 1)[m]  # [n, head]
        self.sums[self._row[layer]] += sel.sum(0).cpu().numpy()
        self.counts[self._row[layer]] += sel.shape[0]

    def merge(self, other: "AttentionEntropyAccumulator") -> "AttentionEntropyAccumulator":
        if other.layers != self.layers or other.sums.shape != self.sums.shape:
            raise InputError("cannot merge attention-entropy accumulators over different layers/heads")
        self.sums = self.sums + other.sums
        self.counts = self.counts + other.counts
        return self

    def finalize(self) -> AttentionEntropyResult:
        if (self.counts == 0).any():
            raise InputError("no query positions were selected; nothing to average")
        return AttentionEntropyResult(layers=self.layers, per_head=self.sums / self.counts[:, None], n_queries=int(self.counts[0]))


def _iter_batches(model: Any, batches: Any) -> Iterable[tuple[Tensor, Tensor | None, Any]]:
    """Yield (tokens, attention_mask, positions-or-None) from tensors or tuples."""
    if isinstance(batches, Tensor) or (isinstance(batches, list) and batches and isinstance(batches[0], str)):
        batches = [batches]
    for item in batches:
        if isinstance(item, dict):
            yield _as_tokens(model, item["tokens"]), item.get("attention_mask"), item.get("positions")
        elif isinstance(item, tuple):
            toks = _as_tokens(model, item[0])
            yield toks, (item[1] if len(item) > 1 else None), (item[2] if len(item) > 2 else None)
        else:
            yield _as_tokens(model, item), None, None


def attention_entropy(
    model: Any,
    batches: Any,
    *,
    positions: Positions = "last",
    layers: Iterable[int] | int | None = None,
) -> AttentionEntropyResult:
    """Attention entropy per head and layer at the chosen query positions, streamed over batches.

    Args:
        batches: a token tensor, or an iterable of tensors / ``(tokens, attention_mask)`` /
            ``(tokens, attention_mask, positions)`` tuples / dicts with those keys.
        positions: query positions (see manifold._position_mask), used when a batch gives none.
    """
    _hook_model_check(model)
    layer_list = _norm_layers(model, layers)
    acc = AttentionEntropyAccumulator(layer_list, model.cfg.n_heads)
    names = [f"blocks.{layer}.attn.hook_pattern" for layer in layer_list]
    for toks, mask, pos in _iter_batches(model, batches):
        store, _ = _forward_capture(model, toks, names, mask)
        qmask = _position_mask(positions if pos is None else pos, toks.shape[0], toks.shape[1], mask)
        for layer, name in zip(layer_list, names):
            acc.update(layer, store[name], qmask)
    return acc.finalize()


# ---------------------------------------------------------------------------------------------
# query–key alignment


def _valid_keys(batch: int, n_pos: int, attention_mask: Tensor | None) -> Bool[Tensor, "batch query_pos key_pos"]:
    """Causal (and key-padding) validity of each (query, key) entry."""
    causal = torch.ones(n_pos, n_pos, dtype=torch.bool).tril()
    valid = causal.expand(batch, n_pos, n_pos)
    if attention_mask is not None:
        valid = valid & attention_mask.detach().cpu().bool()[:, None, :]
    return valid


@dataclass(frozen=True, eq=False)
class QKAlignmentResult:
    """Query–key alignment per layer and head at the chosen query positions.

    Attributes:
        cos_top: [layers, heads] mean cos(q_i, k_{argmax_j α_ij}).
        cos_other: [layers, heads] mean over other valid keys of cos(q_i, k_j).
        margin: cos_top − cos_other (the reported alignment).
    """

    layers: list[int]
    cos_top: np.ndarray
    cos_other: np.ndarray

    @property
    def margin(self) -> np.ndarray:
        return self.cos_top - self.cos_other

    @property
    def per_layer(self) -> np.ndarray:
        return self.margin.mean(1)

    def to_dataframe(self):
        import pandas as pd

        return pd.DataFrame(
            [
                {"layer": layer, "head": h, "cos_top": float(self.cos_top[i, h]), "cos_other": float(self.cos_other[i, h]), "alignment": float(self.margin[i, h])}
                for i, layer in enumerate(self.layers)
                for h in range(self.cos_top.shape[1])
            ]
        )

    def plot(self, ax=None):
        import matplotlib.pyplot as plt

        if ax is None:
            _, ax = plt.subplots(figsize=(5, 3.5))
        ax.plot(self.layers, self.cos_top.mean(1), "o-", label="cos(q, k of attended key)")
        ax.plot(self.layers, self.cos_other.mean(1), "s--", label="cos(q, other keys)")
        ax.set_xlabel("layer")
        ax.set_ylabel("cosine")
        ax.set_title("query–key alignment", fontsize=9)
        ax.legend(fontsize=8)
        return ax


def query_key_alignment(
    model: Any,
    batches: Any,
    *,
    positions: Positions = "last",
    layers: Iterable[int] | int | None = None,
) -> QKAlignmentResult:
    """Mean cos(q_i, k_{j*}) for the argmax key j* vs the other valid keys (see module docstring)."""
    _hook_model_check(model)
    layer_list = _norm_layers(model, layers)
    rot = getattr(model.cfg, "positional_embedding_type", "") == "rotary"
    qn, kn = ("hook_rot_q", "hook_rot_k") if rot else ("hook_q", "hook_k")
    H = model.cfg.n_heads
    rep = H // _n_kv_heads(model)
    s_top = np.zeros((len(layer_list), H))
    s_oth = np.zeros((len(layer_list), H))
    cnt = 0
    for toks, mask, pos in _iter_batches(model, batches):
        names = []
        for layer in layer_list:
            names += [f"blocks.{layer}.attn.{qn}", f"blocks.{layer}.attn.{kn}", f"blocks.{layer}.attn.hook_pattern"]
        store, _ = _forward_capture(model, toks, names, mask)
        qmask = _position_mask(positions if pos is None else pos, toks.shape[0], toks.shape[1], mask)
        n_rows = int(qmask.sum())
        for i, layer in enumerate(layer_list):
            q = store[f"blocks.{layer}.attn.{qn}"].float().cpu()
            k = store[f"blocks.{layer}.attn.{kn}"].float().cpu()
            if k.shape[2] != H:
                k = k.repeat_interleave(rep, dim=2)
            pat = store[f"blocks.{layer}.attn.hook_pattern"].float().cpu()  # b h q k
            cos = torch.einsum("bqhd,bkhd->bhqk", F.normalize(q, dim=-1), F.normalize(k, dim=-1))
            valid = _valid_keys(toks.shape[0], toks.shape[1], mask).unsqueeze(1).expand_as(pat)
            top = pat.argmax(-1, keepdim=True)
            c_top = cos.gather(-1, top).squeeze(-1)  # b h q
            onehot = torch.zeros_like(valid).scatter_(-1, top, True)
            others = valid & ~onehot
            n_o = others.sum(-1).clamp_min(1)
            c_oth = torch.where(others, cos, torch.zeros_like(cos)).sum(-1) / n_o
            m = qmask.unsqueeze(1).expand_as(c_top)
            s_top[i] += (c_top * m).sum((0, 2)).numpy()
            s_oth[i] += (c_oth * m).sum((0, 2)).numpy()
        cnt += n_rows
    if cnt == 0:
        raise InputError("no query positions were selected")
    return QKAlignmentResult(layers=layer_list, cos_top=s_top / cnt, cos_other=s_oth / cnt)


# ---------------------------------------------------------------------------------------------
# head ablation


@dataclass(frozen=True, eq=False)
class HeadAblationResult:
    """Metric change when one head's hook_z is ablated: ``delta[l, h] = metric_ablated − metric_clean``."""

    layers: list[int]
    heads: list[int]
    baseline: float
    delta: np.ndarray
    mode: str
    metric_name: str = "loss"

    def to_dataframe(self):
        import pandas as pd

        return pd.DataFrame(
            [
                {"layer": layer, "head": h, "mode": self.mode, "metric": self.metric_name, "baseline": self.baseline, "delta": float(self.delta[i, j])}
                for i, layer in enumerate(self.layers)
                for j, h in enumerate(self.heads)
            ]
        )

    def plot(self, ax=None):
        import matplotlib.pyplot as plt

        if ax is None:
            _, ax = plt.subplots(figsize=(5, 3.5))
        im = ax.imshow(self.delta, aspect="auto", cmap="magma")
        ax.set_xticks(range(len(self.heads)), self.heads)
        ax.set_yticks(range(len(self.layers)), self.layers)
        ax.set_xlabel("head")
        ax.set_ylabel("layer")
        ax.figure.colorbar(im, ax=ax, label=f"Δ {self.metric_name}")
        ax.set_title(f"head importance ({self.mode}-ablation)", fontsize=9)
        return ax


def next_token_loss(logits: Tensor, tokens: Tensor) -> Tensor:
    """Mean next-token cross-entropy."""
    lg = logits if logits.dtype in (torch.float32, torch.float64) else logits.float()
    return F.cross_entropy(lg[:, :-1].flatten(0, 1), tokens[:, 1:].flatten().to(logits.device))


def head_ablation(
    model: Any,
    tokens: Int[Tensor, "batch pos"],
    *,
    mode: Literal["zero", "mean"] = "mean",
    metric: Callable[[Tensor, Tensor], Tensor] | None = None,
    metric_name: str = "loss",
    layers: Iterable[int] | int | None = None,
    heads: Iterable[int] | int | None = None,
) -> HeadAblationResult:
    """Importance of each head: metric(ablated) − metric(clean), one head at a time.

    Args:
        mode: "zero" (z_h := 0) or "mean" (z_h := its mean over batch and positions).
        metric: ``metric(logits, tokens) -> scalar``; default mean next-token cross-entropy. Any
            calibration error works too (e.g. a closure over a wind tunnel's Bayes posteriors).
    """
    _hook_model_check(model)
    if mode not in ("zero", "mean"):
        raise InputError(f"mode must be 'zero' or 'mean', got {mode!r}")
    toks = _as_tokens(model, tokens)
    layer_list = _norm_layers(model, layers)
    head_list = _norm_heads(model, heads)
    metric = metric or next_token_loss
    dev = model.cfg.device
    names = [f"blocks.{layer}.attn.hook_z" for layer in layer_list]
    store, logits = _forward_capture(model, toks, names if mode == "mean" else [], return_logits=True)
    base = float(metric(logits, toks.to(dev)))
    delta = np.zeros((len(layer_list), len(head_list)))
    for i in range(len(layer_list)):
        mean_z = store[names[i]].mean((0, 1)) if mode == "mean" else None
        for j, h in enumerate(head_list):

            def ablate(z: Tensor, hook: Any, h: int = h, mean_z: Tensor | None = mean_z) -> Tensor:
                z = z.clone()
                z[:, :, h] = 0.0 if mean_z is None else mean_z[h]
                return z

            with torch.no_grad(), _scoped_hooks(model, [(names[i], ablate)]):
                out = model(toks.to(dev))
            delta[i, j] = float(metric(out, toks.to(dev))) - base
    return HeadAblationResult(layers=layer_list, heads=head_list, baseline=base, delta=delta, mode=mode, metric_name=metric_name)
