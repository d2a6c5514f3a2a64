"""The M-step side of attention: responsibilities, value specialization, value-update alignment.

Paper II (arXiv 2512.22473) reads attention as an E-step (soft responsibilities α_ij) and the
value update Δv_j = −η Σ_i α_ij u_i as an M-step: each value is pulled towards the negative error
signals of the queries that use it, weighted by their responsibility. Repeated, this makes values
prototypes of query clusters ("coupled specialization", PAPERS.md §2): after a value step
Δb_ij = u_i·Δv_j = −η Σ_{i'} α_{i'j}(u_i·u_{i'}), so where the queries using j have aligned error
signals the advantage of j rises and they attend to j more.

This module measures

- **responsibility** r_j = Σ_i α_ij per head (query rows summed; Σ_j r_j = number of valid query
  rows, since every row of α sums to 1);
- **specialization**: queries carry a group label (latent state, hypothesis, query token, position
  bucket: the caller decides). For each value (key position j of each sequence) the responsibility
  is split over groups, R_jg = Σ_{i∈g} α_ij; its entropy over the G groups divided by ln G lies in
  [0, 1]. A value is a *specialist* when that normalised entropy is < ``specialist_threshold``
  (default 0.5) and a *generalist* when it is > ``generalist_threshold`` (default 0.9). Values whose
  total responsibility Σ_g R_jg is below ``min_responsibility`` (default 0.1, i.e. a tenth of one
  query's attention) are not classified (their split is noise);
- **value-update alignment** (:func:`value_update_alignment`): per head, the cosine between the
  observed change of every value vector after one optimizer step (on a deep copy; same inputs
  before/after) and the prediction −η Σ_i α_ij u_i read from :func:`bayesmanifold.hooks.capture`;
- **positive-feedback probe** (:func:`positive_feedback_probe`): after a value-only SGD step, the
  correlation between the observed Δb_ij and the predicted −η Σ_{i'} α_{i'j}(u_i·u_{i'}), and
  whether a subsequent routing step moves attention towards the keys whose advantage rose.

Under GQA the value vectors are per kv head; value-update alignment is reported per kv head (the
prediction sums the query heads of the group, as autograd does).
"""

import copy
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from jaxtyping import Float, Int
from torch import Tensor

from ..errors import InputError
from .geometry import _valid_keys
from .manifold import _as_tokens, _forward_capture, _hook_model_check, _n_kv_heads, _norm_layers

__all__ = [
    "SpecializationAccumulator",
    "SpecializationResult",
    "specialization",
    "ValueUpdateAlignmentResult",
    "value_update_alignment",
    "PositiveFeedbackResult",
    "positive_feedback_probe",
]


# ---------------------------------------------------------------------------------------------
# responsibility and specialization


@dataclass(frozen=True, eq=False)
class SpecializationResult:
    """Responsibility and specialization per layer and head.

    Attributes:
        layers: layer index of each row.
        responsibility_mean: [layers, heads] mean r_j over values (key positions).
        responsibility_total: [layers, heads] Σ_j r_j (= number of valid query rows × batches).
        n_query_rows: valid query rows seen (Σ_j r_j must equal this per head).
        normalized_entropy: [layers, heads] mean normalised group entropy over classified values.
        weighted_entropy: same, weighted by each value's responsibility.
        specialist_share, generalist_share: [layers, heads] fractions of classified values.
        n_values: [layers, heads] classified values.
        n_groups: G.
    """

    layers: list[int]
    responsibility_mean: np.ndarray
    responsibility_total: np.ndarray
    n_query_rows: int
    normalized_entropy: np.ndarray
    weighted_entropy: np.ndarray
    specialist_share: np.ndarray
    generalist_share: np.ndarray
    n_values: np.ndarray
    n_groups: int
    specialist_threshold: float
    generalist_threshold: float

    def per_head(self) -> dict[str, dict[str, float]]:
        """``{"L{l}H{h}": {...}}`` JSON-able summary."""
        out = {}
        for i, layer in enumerate(self.layers):
            for h in range(self.specialist_share.shape[1]):
                out[f"L{layer}H{h}"] = {
                    "normalized_entropy": float(self.normalized_entropy[i, h]),
                    "specialist_share": float(self.specialist_share[i, h]),
                    "generalist_share": float(self.generalist_share[i, h]),
                    "responsibility_mean": float(self.responsibility_mean[i, h]),
                }
        return out

    def to_dataframe(self):
        import pandas as pd

        rows = []
        for i, layer in enumerate(self.layers):
            for h in range(self.specialist_share.shape[1]):
                rows.append(
                    {
                        "layer": layer,
                        "head": h,
                        "responsibility_mean": float(self.responsibility_mean[i, h]),
                        "normalized_entropy": float(self.normalized_entropy[i, h]),
                        "weighted_entropy": float(self.weighted_entropy[i, h]),
                        "specialist_share": float(self.specialist_share[i, h]),
                        "generalist_share": float(self.generalist_share[i, h]),
                        "n_values": int(self.n_values[i, h]),
                    }
                )
        return pd.DataFrame(rows)

    def plot(self, ax=None):
        import matplotlib.pyplot as plt

        if ax is None:
            _, ax = plt.subplots(figsize=(5, 3.5))
        im = ax.imshow(self.specialist_share, aspect="auto", vmin=0, vmax=1, cmap="viridis")
        ax.set_yticks(range(len(self.layers)), self.layers)
        ax.set_xlabel("head")
        ax.set_ylabel("layer")
        ax.figure.colorbar(im, ax=ax, label=f"share of specialists (norm. entropy < {self.specialist_threshold})")
        ax.set_title(f"value specialization over {self.n_groups} query groups", fontsize=9)
        return ax


class SpecializationAccumulator:
    """Streaming responsibility/specialization statistics; mergeable.

    Args:
        layers: the layers that will be updated.
        n_heads: query heads per layer.
        n_groups: number of query groups G (labels 0..G−1; −1 = query not counted).
        specialist_threshold, generalist_threshold, min_responsibility: see the module docstring.
    """

    def __init__(
        self,
        layers: Iterable[int],
        n_heads: int,
        n_groups: int,
        *,
        specialist_threshold: float = 0.5,
        generalist_threshold: float = 0.9,
        min_responsibility: float = 0.1,
    ) -> None:
        if n_groups < 2:
            raise InputError(f"specialization needs at least 2 query groups, got {n_groups}")
        if not 0 <= specialist_threshold <= generalist_threshold <= 1:
            raise InputError("need 0 ≤ specialist_threshold ≤ generalist_threshold ≤ 1")
        self.layers = list(layers)
        self._row = {layer: i for i, layer in enumerate(self.layers)}
        self.n_heads, self.n_groups = n_heads, n_groups
        self.spec_t, self.gen_t, self.min_r = specialist_threshold, generalist_threshold, min_responsibility
        shape = (len(self.layers), n_heads)
        self.r_sum = np.zeros(shape)
        self.n_keys = np.zeros(shape)
        self.ent_sum = np.zeros(shape)
        self.went_sum = np.zeros(shape)
        self.w_sum = np.zeros(shape)
        self.n_spec = np.zeros(shape)
        self.n_gen = np.zeros(shape)
        self.n_cls = np.zeros(shape)
        self.rows = np.zeros(len(self.layers))

    def update(
        self,
        layer: int,
        pattern: Float[Tensor, "batch head query_pos key_pos"],
        groups: Int[Tensor, "batch query_pos"],
        key_valid: Any = None,
    ) -> None:
        """Add one layer's pattern with the group label of every query position.

        Args:
            groups: Int[batch, query_pos] (or Int[query_pos], broadcast) labels in 0..G−1, −1 to
                leave a query out.
            key_valid: optional Bool[batch, key_pos] (padding); values at invalid keys are skipped.
        """
        if layer not in self._row:
            raise InputError(f"layer {layer} not among the accumulator's layers {self.layers}")
        b, H, nq, nk = pattern.shape
        g = _check_groups(groups, b, nq, self.n_groups)
        p = pattern.detach().to("cpu", torch.float64)
        onehot = torch.zeros(b, nq, self.n_groups, dtype=torch.float64)
        sel = g >= 0
        onehot[sel] = torch.nn.functional.one_hot(g[sel], self.n_groups).double()
        R = torch.einsum("bhqk,bqg->bhkg", p, onehot)  # responsibility of each value per group
        r_all = p.sum(2)  # b h k: responsibility over all query rows
        kv = torch.ones(b, nk, dtype=torch.bool) if key_valid is None else torch.as_tensor(key_valid).bool().cpu()
        i = self._row[layer]
        kvh = kv[:, None, :].expand(b, H, nk)
        self.r_sum[i] += (r_all * kvh).sum((0, 2)).numpy()
        self.n_keys[i] += kvh.sum((0, 2)).numpy()
        self.rows[i] += int((p.sum(-1)[:, 0] > 0.5).sum())
        tot = R.sum(-1)  # b h k
        q = R / tot.clamp_min(1e-300).unsqueeze(-1)
        ent = -(torch.where(q > 0, q * torch.log(q.clamp_min(1e-300)), torch.zeros_like(q))).sum(-1) / np.log(self.n_groups)
        cls = (tot >= self.min_r) & kvh
        self.n_cls[i] += cls.sum((0, 2)).numpy()
        self.ent_sum[i] += torch.where(cls, ent, 0.0).sum((0, 2)).numpy()
        self.went_sum[i] += torch.where(cls, ent * tot, 0.0).sum((0, 2)).numpy()
        self.w_sum[i] += torch.where(cls, tot, 0.0).sum((0, 2)).numpy()
        self.n_spec[i] += (cls & (ent < self.spec_t)).sum((0, 2)).numpy()
        self.n_gen[i] += (cls & (ent > self.gen_t)).sum((0, 2)).numpy()

    def merge(self, other: "SpecializationAccumulator") -> "SpecializationAccumulator":
        if other.layers != self.layers or other.n_groups != self.n_groups or other.n_heads != self.n_heads:
            raise InputError("cannot merge specialization accumulators with different layers/heads/groups")
        for name in ("r_sum", "n_keys", "ent_sum", "went_sum", "w_sum", "n_spec", "n_gen", "n_cls", "rows"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        return self

    def finalize(self) -> SpecializationResult:
        if self.n_keys.sum() == 0:
            raise InputError("no values were seen; call update() with at least one batch")
        ncls = np.maximum(self.n_cls, 1)
        nan_if_empty = np.where(self.n_cls > 0, 1.0, np.nan)
        return SpecializationResult(
            layers=self.layers,
            responsibility_mean=self.r_sum / np.maximum(self.n_keys, 1),
            responsibility_total=self.r_sum.copy(),
            n_query_rows=int(self.rows[0]),
            normalized_entropy=self.ent_sum / ncls * nan_if_empty,
            weighted_entropy=self.went_sum / np.maximum(self.w_sum, 1e-300) * nan_if_empty,
            specialist_share=self.n_spec / ncls * nan_if_empty,
            generalist_share=self.n_gen / ncls * nan_if_empty,
            n_values=self.n_cls.astype(int),
            n_groups=self.n_groups,
            specialist_threshold=self.spec_t,
            generalist_threshold=self.gen_t,
        )


def _check_groups(groups: Any, batch: int, n_pos: int, n_groups: int) -> Tensor:
    g = torch.as_tensor(groups).detach().cpu()
    if g.dtype.is_floating_point or g.dtype == torch.bool:
        raise InputError(f"groups must be integer labels, got dtype {g.dtype}")
    g = g.long()
    if g.dim() == 1:
        if g.shape[0] != n_pos:
            raise InputError(f"groups has length {g.shape[0]} but there are {n_pos} query positions; give one label per query position")
        g = g.expand(batch, n_pos)
    if tuple(g.shape) != (batch, n_pos):
        raise InputError(f"groups must have shape (batch, query_pos)=({batch}, {n_pos}) or ({n_pos},), got {tuple(g.shape)}")
    if int(g.max()) >= n_groups or int(g.min()) < -1:
        raise InputError(f"group labels must lie in 0..{n_groups - 1} (or −1 to skip), got {int(g.min())}..{int(g.max())}")
    return g


def specialization(
    model: Any,
    batches: Any,
    *,
    n_groups: int | None = None,
    layers: Iterable[int] | int | None = None,
    specialist_threshold: float = 0.5,
    generalist_threshold: float = 0.9,
    min_responsibility: float = 0.1,
) -> SpecializationResult:
    """Responsibility and value specialization per head over a stream of batches.

    Args:
        batches: ``(tokens, groups)`` pairs, or ``(tokens, groups, attention_mask)`` triples, or a
            list of them; ``groups`` is Int[batch, pos] or Int[pos] (one label per query position,
            −1 to skip).
        n_groups: G (default: max label + 1 over the first batch).

    Example:
        >>> res = specialization(model, [(tokens, tokens % 4)], n_groups=4)  # doctest: +SKIP
    """
    _hook_model_check(model)
    layer_list = _norm_layers(model, layers)
    if isinstance(batches, tuple):
        batches = [batches]
    acc = None
    names = [f"blocks.{layer}.attn.hook_pattern" for layer in layer_list]
    for item in batches:
        if not isinstance(item, tuple | list) or len(item) < 2:
            raise InputError("each batch must be a (tokens, groups) or (tokens, groups, attention_mask) tuple")
        toks = _as_tokens(model, item[0])
        mask = item[2] if len(item) > 2 else None
        groups = torch.as_tensor(item[1])
        if acc is None:
            G = int(groups.max()) + 1 if n_groups is None else int(n_groups)
            acc = SpecializationAccumulator(
                layer_list,
                model.cfg.n_heads,
                G,
                specialist_threshold=specialist_threshold,
                generalist_threshold=generalist_threshold,
                min_responsibility=min_responsibility,
            )
        _check_groups(groups, toks.shape[0], toks.shape[1], acc.n_groups)
        store, _ = _forward_capture(model, toks, names, mask)
        kv = None if mask is None else torch.as_tensor(mask).bool()
        for layer, name in zip(layer_list, names):
            acc.update(layer, store[name], groups, kv)
    if acc is None:
        raise InputError("no batches given")
    return acc.finalize()


# ---------------------------------------------------------------------------------------------
# value-update alignment


def _default_objective(attention_mask: Tensor | None) -> Callable[[Tensor, Tensor], Tensor]:
    from ..hooks import next_token_loss

    return next_token_loss(attention_mask)


def _value_param_names(model: Any, layers: list[int]) -> list[str]:
    names = []
    for n, _ in model.named_parameters():
        parts = n.split(".")
        if len(parts) >= 4 and parts[0] == "blocks" and parts[2] == "attn" and int(parts[1]) in layers:
            if parts[3] in ("W_V", "b_V", "_W_V", "_b_V"):
                names.append(n)
    return names


def _qk_param_names(model: Any) -> list[str]:
    return [
        n for n, _ in model.named_parameters() if n.split(".")[-1] in ("W_Q", "W_K", "b_Q", "b_K", "_W_K", "_b_K")
    ]


def _step_copy(
    model: Any,
    tokens: Tensor,
    objective: Callable,
    attention_mask: Tensor | None,
    param_names: list[str] | None,
    lr: float,
    optimizer_factory: Callable | None,
) -> Any:
    """Deep-copy the model and take one optimizer step on it (all params, or the named ones)."""
    new = copy.deepcopy(model)
    params = dict(new.named_parameters())
    chosen = list(params) if param_names is None else param_names
    for n, p in params.items():
        p.requires_grad_(n in chosen)
        p.grad = None
    opt = (optimizer_factory or (lambda ps: torch.optim.SGD(ps, lr=lr)))([params[n] for n in chosen])
    kw = {} if attention_mask is None else {"attention_mask": attention_mask.to(new.cfg.device)}
    with torch.enable_grad():
        logits = new(tokens.to(new.cfg.device), **kw)
        loss = objective(logits, tokens.to(new.cfg.device))
        opt.zero_grad()
        loss.backward()
    opt.step()
    for p in params.values():
        p.grad = None
    return new


def _kept_bundles(model: Any, tokens: Tensor, layers: list[int], objective: Callable, attention_mask: Tensor | None):
    from ..hooks import capture

    with capture(model, layers=layers, keep=True, keep_device="cpu", objective=objective) as cap:
        loss = cap.run(tokens, attention_mask=attention_mask)
        kept = dict(cap.kept)
    return kept, loss


@dataclass(frozen=True, eq=False)
class ValueUpdateAlignmentResult:
    """Cosine between the observed value change and −η Σ_i α_ij u_i, per layer and kv head.

    Attributes:
        cosine: [layers, kv_heads] cosine over all (batch, key_pos, d_head) entries at once.
        mean_vector_cosine: [layers, kv_heads] mean over value vectors of the per-vector cosine.
        relative_change: [layers, kv_heads] ‖Δv‖/‖v‖.
        params: which parameters were stepped ("all" or "values").
    """

    layers: list[int]
    cosine: np.ndarray
    mean_vector_cosine: np.ndarray
    relative_change: np.ndarray
    lr: float
    params: str

    def to_dataframe(self):
        import pandas as pd

        return pd.DataFrame(
            [
                {
                    "layer": layer,
                    "kv_head": h,
                    "cosine": float(self.cosine[i, h]),
                    "mean_vector_cosine": float(self.mean_vector_cosine[i, h]),
                    "relative_change": float(self.relative_change[i, h]),
                    "params": self.params,
                }
                for i, layer in enumerate(self.layers)
                for h in range(self.cosine.shape[1])
            ]
        )

    def plot(self, ax=None):
        import matplotlib.pyplot as plt

        if ax is None:
            _, ax = plt.subplots(figsize=(5, 3.5))
        im = ax.imshow(self.cosine, aspect="auto", vmin=-1, vmax=1, cmap="RdBu")
        ax.set_yticks(range(len(self.layers)), self.layers)
        ax.set_xlabel("kv head")
        ax.set_ylabel("layer")
        ax.figure.colorbar(im, ax=ax, label="cos(Δv observed, −η Σ α u)")
        ax.set_title(f"value-update alignment (step on {self.params} params)", fontsize=9)
        return ax


def value_update_alignment(
    model: Any,
    tokens: Int[Tensor, "batch pos"],
    *,
    lr: float = 1e-2,
    params: Literal["all", "values"] = "all",
    optimizer_factory: Callable | None = None,
    objective: Callable[[Tensor, Tensor], Tensor] | None = None,
    attention_mask: Tensor | None = None,
    layers: Iterable[int] | int | None = None,
) -> ValueUpdateAlignmentResult:
    """Does one optimizer step move each value along −η Σ_i α_ij u_i? (Paper II's M-step.)

    The model is deep-copied and one step taken on the copy (SGD with ``lr`` unless
    ``optimizer_factory(params) -> optimizer`` is given); the user's model is not changed. With
    ``params="values"`` only W_V/b_V are stepped, so the inputs of every layer's values stay the
    same and the observed change is W_V's; with ``"all"`` upstream changes are included.
    Note: parametric SGD on W_V moves v_j by −η Σ_{j'} (x_j·x_{j'}) g_{j'}, a kernel-smoothed
    version of the per-vector prediction, so the cosine measures how closely the parametric
    update follows the responsibility-weighted direction.
    """
    _hook_model_check(model)
    if params not in ("all", "values"):
        raise InputError(f"params must be 'all' or 'values', got {params!r}")
    toks = _as_tokens(model, tokens)
    layer_list = _norm_layers(model, layers)
    obj = objective or _default_objective(attention_mask)
    kept, _ = _kept_bundles(model, toks, layer_list, obj, attention_mask)
    names = [f"blocks.{layer}.attn.hook_v" for layer in layer_list]
    before, _ = _forward_capture(model, toks, names, attention_mask)
    pnames = None if params == "all" else _value_param_names(model, list(range(model.cfg.n_layers)))
    new = _step_copy(model, toks, obj, attention_mask, pnames, lr, optimizer_factory)
    after, _ = _forward_capture(new, toks, names, attention_mask)
    del new
    n_kv = _n_kv_heads(model)
    key_valid = torch.ones(toks.shape, dtype=torch.bool) if attention_mask is None else attention_mask.bool().cpu()
    cos = np.zeros((len(layer_list), n_kv))
    mcos = np.zeros_like(cos)
    rel = np.zeros_like(cos)
    for i, (layer, name) in enumerate(zip(layer_list, names)):
        pred = -lr * kept[layer].grad_values.double().cpu()  # b k kv d (autograd Σ_i α_ij u_i, group-summed)
        obs = (after[name] - before[name]).double().cpu()
        v0 = before[name].double().cpu()
        for h in range(n_kv):
            p, o = pred[:, :, h][key_valid], obs[:, :, h][key_valid]
            cos[i, h] = float(torch.nn.functional.cosine_similarity(p.flatten(), o.flatten(), dim=0))
            ok = p.norm(dim=-1) > 1e-12 * max(float(p.norm(dim=-1).max()), 1e-300)
            mcos[i, h] = float(torch.nn.functional.cosine_similarity(p[ok], o[ok], dim=-1).mean()) if ok.any() else float("nan")
            rel[i, h] = float(o.norm() / v0[:, :, h][key_valid].norm().clamp_min(1e-300))
    return ValueUpdateAlignmentResult(layers=layer_list, cosine=cos, mean_vector_cosine=mcos, relative_change=rel, lr=lr, params=params)


# ---------------------------------------------------------------------------------------------
# positive feedback


@dataclass(frozen=True, eq=False)
class PositiveFeedbackResult:
    """Positive-feedback probe per layer and query head.

    Attributes:
        db_corr: [layers, heads] Pearson r between observed Δb_ij (value step) and the prediction
            −η Σ_{i'} α_{i'j}(u_i·u_{i'}), over valid (query, key) entries.
        feedback_corr: [layers, heads] Pearson r between the advantage change ΔA_ij caused by the
            value step and the extra attention change Δα_ij it causes in the following routing
            step (routing step after the value step minus routing step without it).
        sign_agreement: [layers, heads] |ΔA|-weighted fraction of entries where sign(extra Δα)
            = sign(ΔA) (0.5 = chance).
    """

    layers: list[int]
    db_corr: np.ndarray
    feedback_corr: np.ndarray
    sign_agreement: np.ndarray
    lr: float

    def to_dataframe(self):
        import pandas as pd

        return pd.DataFrame(
            [
                {
                    "layer": layer,
                    "head": h,
                    "db_corr": float(self.db_corr[i, h]),
                    "feedback_corr": float(self.feedback_corr[i, h]),
                    "sign_agreement": float(self.sign_agreement[i, h]),
                }
                for i, layer in enumerate(self.layers)
                for h in range(self.db_corr.shape[1])
            ]
        )

    def plot(self, ax=None):
        import matplotlib.pyplot as plt

        if ax is None:
            _, ax = plt.subplots(figsize=(5, 3.5))
        x = np.arange(self.db_corr.size)
        ax.bar(x - 0.2, self.db_corr.ravel(), width=0.4, label="corr(Δb obs, pred)")
        ax.bar(x + 0.2, self.feedback_corr.ravel(), width=0.4, label="corr(ΔA, extra Δα)")
        ax.set_xlabel("layer × head")
        ax.set_ylabel("Pearson r")
        ax.set_title("positive feedback: value step → advantage → attention", fontsize=9)
        ax.legend(fontsize=8)
        return ax


def _pearson(a: Tensor, b: Tensor) -> float:
    a, b = a.double() - a.double().mean(), b.double() - b.double().mean()
    den = a.norm() * b.norm()
    return float((a * b).sum() / den) if den > 0 else float("nan")


def _patterns(model: Any, toks: Tensor, layers: list[int], mask: Tensor | None) -> dict[int, Tensor]:
    names = [f"blocks.{layer}.attn.hook_pattern" for layer in layers]
    store, _ = _forward_capture(model, toks, names, mask)
    return {layer: store[n].double().cpu() for layer, n in zip(layers, names)}


def positive_feedback_probe(
    model: Any,
    tokens: Int[Tensor, "batch pos"],
    *,
    lr: float = 1e-2,
    routing_lr: float | None = None,
    objective: Callable[[Tensor, Tensor], Tensor] | None = None,
    attention_mask: Tensor | None = None,
    layers: Iterable[int] | int | None = None,
) -> PositiveFeedbackResult:
    """Probe the value → advantage → attention feedback loop of Paper II (PAPERS.md §2).

    1. Capture α, u, v, b at θ₀. 2. Take a value-only SGD step (W_V, b_V of every layer) on a
    copy → θ₁; capture b again: observed Δb vs predicted −η Σ_{i'} α_{i'j}(u_i·u_{i'}).
    3. Take a routing step (W_Q, W_K, b_Q, b_K; ``routing_lr``, default ``lr``) from θ₁ and from θ₀;
    the difference of their attention changes is the attention change caused by the value step,
    compared with the advantage change ΔA_ij = −(Δb_ij − Δb̄_i).
    """
    _hook_model_check(model)
    toks = _as_tokens(model, tokens)
    layer_list = _norm_layers(model, layers)
    obj = objective or _default_objective(attention_mask)
    rlr = lr if routing_lr is None else routing_lr
    valid = _valid_keys(toks.shape[0], toks.shape[1], attention_mask)  # b q k
    k0, _ = _kept_bundles(model, toks, layer_list, obj, attention_mask)
    m1 = _step_copy(model, toks, obj, attention_mask, _value_param_names(model, list(range(model.cfg.n_layers))), lr, None)
    k1, _ = _kept_bundles(m1, toks, layer_list, obj, attention_mask)
    qk = _qk_param_names(model)
    a0 = _patterns(model, toks, layer_list, attention_mask)
    a1 = _patterns(m1, toks, layer_list, attention_mask)
    r0 = _step_copy(model, toks, obj, attention_mask, qk, rlr, None)
    a0r = _patterns(r0, toks, layer_list, attention_mask)
    del r0
    r1 = _step_copy(m1, toks, obj, attention_mask, qk, rlr, None)
    a1r = _patterns(r1, toks, layer_list, attention_mask)
    del r1, m1
    H = model.cfg.n_heads
    dbc = np.full((len(layer_list), H), np.nan)
    fbc = np.full_like(dbc, np.nan)
    sgn = np.full_like(dbc, np.nan)
    for i, layer in enumerate(layer_list):
        b0, b1 = k0[layer], k1[layer]
        alpha = b0.pattern.double()  # b h q k
        u = b0.grad_z.double()  # b q h d
        g = torch.einsum("bhqk,bqhd->bkhd", alpha, u)  # Σ_i α_ij u_i per query head
        pred = -lr * torch.einsum("bqhd,bkhd->bhqk", u, g)
        db = b1.grad_pattern.double() - b0.grad_pattern.double()
        bbar0 = (alpha * b0.grad_pattern.double() * valid[:, None]).sum(-1, keepdim=True)
        alpha1 = b1.pattern.double()
        bbar1 = (alpha1 * b1.grad_pattern.double() * valid[:, None]).sum(-1, keepdim=True)
        dA = -((b1.grad_pattern.double() - bbar1) - (b0.grad_pattern.double() - bbar0))
        extra = (a1r[layer] - a1[layer]) - (a0r[layer] - a0[layer])
        for j, h in enumerate(b0.heads):
            v = valid & b0.query_valid.cpu()[:, :, None]
            dbc[i, h] = _pearson(db[:, j][v], pred[:, j][v])
            # only entries with a choice: queries with ≥ 2 valid keys
            multi = v & (valid.sum(-1, keepdim=True) >= 2)
            x, y = dA[:, j][multi], extra[:, h][multi]
            fbc[i, h] = _pearson(x, y)
            w = x.abs()
            agree = (torch.sign(x) == torch.sign(y)).double()
            sgn[i, h] = float((w * agree).sum() / w.sum()) if w.sum() > 0 else float("nan")
    return PositiveFeedbackResult(layers=layer_list, db_corr=dbc, feedback_corr=fbc, sign_agreement=sgn, lr=lr)
