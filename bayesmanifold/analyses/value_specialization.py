"""Responsibilities and value specialization: the M-step side of attention.

Paper II (arXiv 2512.22473) reads attention as an E-step (soft responsibilities α_ij) and the
value update Δv_j = −η Σ_i α_ij u_i as an M-step: each value is pulled towards the negative error
signals of the queries that use it, weighted by their responsibility. Repeated, this makes values
prototypes of query clusters ("coupled specialization", PAPERS.md §2).

This module measures

- **responsibility** r_j = Σ_i α_ij per head (query rows summed; Σ_j r_j = number of valid query
  rows, since every row of α sums to 1);
- **specialization**: queries carry a group label (latent state, hypothesis, query token, position
  bucket: the caller decides), the batch label ``"group"`` (per sequence ``[batch]`` or per
  position ``[batch, pos]``). For each value (key position j of each sequence) the responsibility
  is split over groups, R_jg = Σ_{i∈g} α_ij; its entropy over the G groups divided by ln G lies in
  [0, 1]. A value is a *specialist* when that normalised entropy is < ``specialist_threshold``
  (default 0.5) and a *generalist* when it is > ``generalist_threshold`` (default 0.9). Values whose
  total responsibility Σ_g R_jg is below ``min_responsibility`` (default 0.1, i.e. a tenth of one
  query's attention) are not classified (their split is noise).
"""

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..backends import ModelLike, model_access
from ..errors import InputError
from ..hooks import Batch, capture
from .stats import entropy

__all__ = ["SpecializationAccumulator", "SpecializationResult", "specialization"]


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
        """Tidy: one row per (layer, head)."""
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

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe: every field as plain lists (NaN stays a float)."""
        arrays = ("responsibility_mean", "responsibility_total", "normalized_entropy", "weighted_entropy",
                  "specialist_share", "generalist_share")
        return {
            "layers": [int(x) for x in self.layers],
            **{k: np.asarray(getattr(self, k), dtype=float).tolist() for k in arrays},
            "n_values": np.asarray(self.n_values).astype(int).tolist(),
            "n_query_rows": int(self.n_query_rows),
            "n_groups": int(self.n_groups),
            "specialist_threshold": float(self.specialist_threshold),
            "generalist_threshold": float(self.generalist_threshold),
        }

    def plot(self, ax=None):
        """Heatmap of the specialist share per layer and head."""
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
    """Streaming responsibility/specialization statistics; a forward-only capture accumulator.

    Each bundle's batch carries the query groups as the label ``label`` (default ``"group"``):
    Int[batch] (one group per sequence) or Int[batch, pos] (per query position), values in
    0..G−1, −1 to leave a query out. Query positions outside ``batch.positions`` (when given) are
    left out too; values at padded keys are not counted.

    Args:
        layers: the layers that will be updated.
        n_heads: query heads per layer.
        n_groups: number of query groups G.
        specialist_threshold, generalist_threshold, min_responsibility: see the module docstring.
        label: the batch label holding the groups.

    Example:
        >>> acc = SpecializationAccumulator([0, 1], model_access(model).n_heads, 4)  # doctest: +SKIP
        >>> with capture(model, accumulators=[acc]) as cap:  # doctest: +SKIP
        ...     cap.run(Batch(tokens=toks, labels={"group": toks % 4}))
        >>> acc.finalize().to_dataframe()  # doctest: +SKIP
    """

    needs_gradients = False

    def __init__(
        self,
        layers: Iterable[int],
        n_heads: int,
        n_groups: int,
        *,
        specialist_threshold: float = 0.5,
        generalist_threshold: float = 0.9,
        min_responsibility: float = 0.1,
        label: str = "group",
    ) -> None:
        if n_groups < 2:
            raise InputError(f"specialization needs at least 2 query groups, got {n_groups}")
        if not 0 <= specialist_threshold <= generalist_threshold <= 1:
            raise InputError("need 0 ≤ specialist_threshold ≤ generalist_threshold ≤ 1")
        self.layers = list(layers)
        self._row = {layer: i for i, layer in enumerate(self.layers)}
        self.n_heads, self.n_groups, self.label = n_heads, n_groups, label
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

    def update(self, bundle: Any) -> None:
        """Add one layer's pattern, split by the query groups of ``bundle.batch``."""
        if bundle.layer not in self._row:
            raise InputError(f"layer {bundle.layer} not among the accumulator's layers {self.layers}")
        batch = bundle.batch
        if batch is None:
            raise InputError(f"specialization needs the batch label {self.label!r}; capture passes the batch")
        b, _, nq, nk = bundle.pattern.shape
        g = _check_groups(batch.label(self.label), b, nq, self.n_groups, per_sequence=True)
        if batch.positions is not None:
            g = torch.where(batch.positions.detach().cpu().bool(), g, -1)
        kv = torch.ones(b, nk, dtype=torch.bool) if batch.attention_mask is None else batch.attention_mask.detach().cpu().bool()
        self._add(self._row[bundle.layer], list(bundle.heads), bundle.pattern, g, kv)

    def _add(self, i: int, heads: list[int], pattern: Tensor, g: Tensor, kv: Tensor) -> None:
        b, H, nq, nk = pattern.shape
        p = pattern.detach().to("cpu", torch.float64)
        onehot = torch.zeros(b, nq, self.n_groups, dtype=torch.float64)
        sel = g >= 0
        onehot[sel] = torch.nn.functional.one_hot(g[sel], self.n_groups).double()
        R = torch.einsum("bhqk,bqg->bhkg", p, onehot)  # responsibility of each value per group
        r_all = p.sum(2)  # b h k: responsibility over all query rows
        kvh = kv[:, None, :].expand(b, H, nk)
        cols = np.asarray(heads)
        self.r_sum[i, cols] += (r_all * kvh).sum((0, 2)).numpy()
        self.n_keys[i, cols] += kvh.sum((0, 2)).numpy()
        self.rows[i] += int((p.sum(-1)[:, 0] > 0.5).sum())
        tot = R.sum(-1)  # b h k
        ent = entropy(R / tot.clamp_min(1e-300).unsqueeze(-1)) / np.log(self.n_groups)
        cls = (tot >= self.min_r) & kvh
        self.n_cls[i, cols] += cls.sum((0, 2)).numpy()
        self.ent_sum[i, cols] += torch.where(cls, ent, 0.0).sum((0, 2)).numpy()
        self.went_sum[i, cols] += torch.where(cls, ent * tot, 0.0).sum((0, 2)).numpy()
        self.w_sum[i, cols] += torch.where(cls, tot, 0.0).sum((0, 2)).numpy()
        self.n_spec[i, cols] += (cls & (ent < self.spec_t)).sum((0, 2)).numpy()
        self.n_gen[i, cols] += (cls & (ent > self.gen_t)).sum((0, 2)).numpy()

    def merge(self, other: "SpecializationAccumulator") -> "SpecializationAccumulator":
        if other.layers != self.layers or other.n_groups != self.n_groups or other.n_heads != self.n_heads:
            raise InputError("cannot merge specialization accumulators with different layers/heads/groups")
        for name in ("r_sum", "n_keys", "ent_sum", "went_sum", "w_sum", "n_spec", "n_gen", "n_cls", "rows"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        return self

    def finalize(self) -> SpecializationResult:
        if self.n_keys.sum() == 0:
            raise InputError("no values were seen; run a capture over at least one batch")
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


def _check_groups(groups: Any, batch: int, n_pos: int, n_groups: int | None, *, per_sequence: bool = False) -> Tensor:
    """Group labels as Int[batch, pos] (CPU), checked: from Int[batch, pos], Int[pos] (broadcast over
    the batch) or, with ``per_sequence``, Int[batch] (one group per sequence). ``n_groups=None``
    checks the shape only."""
    g = torch.as_tensor(groups).detach().cpu()
    if g.dtype.is_floating_point or g.dtype == torch.bool:
        raise InputError(f"groups must be integer labels, got dtype {g.dtype}")
    g = g.long()
    if g.dim() == 1:
        if per_sequence and g.shape[0] == batch:
            g = g[:, None].expand(batch, n_pos)
        elif g.shape[0] != n_pos:
            raise InputError(f"groups has length {g.shape[0]} but there are {n_pos} query positions; give one label per query position")
        else:
            g = g.expand(batch, n_pos)
    if tuple(g.shape) != (batch, n_pos):
        raise InputError(f"groups must have shape (batch, query_pos)=({batch}, {n_pos}) or ({n_pos},), got {tuple(g.shape)}")
    if n_groups is not None and (int(g.max()) >= n_groups or int(g.min()) < -1):
        raise InputError(f"group labels must lie in 0..{n_groups - 1} (or −1 to skip), got {int(g.min())}..{int(g.max())}")
    return g


def _as_batches(model: ModelLike, batches: Any) -> list[Batch]:
    """``(tokens, groups[, attention_mask])`` tuples or Batches (label "group") as Batches."""
    access = model_access(model)
    if isinstance(batches, tuple | Batch):
        batches = [batches]
    out = []
    for item in batches:
        if isinstance(item, Batch):
            out.append(item)
            continue
        if not isinstance(item, tuple | list) or len(item) < 2:
            raise InputError("each batch must be a (tokens, groups) or (tokens, groups, attention_mask) tuple, or a Batch with a 'group' label")
        toks = access.as_tokens(item[0])
        mask = torch.as_tensor(item[2]) if len(item) > 2 and item[2] is not None else None
        groups = _check_groups(item[1], toks.shape[0], toks.shape[1], None)  # Int[pos]: per query position
        out.append(Batch(tokens=toks, attention_mask=mask, labels={"group": groups}))
    if not out:
        raise InputError("no batches given")
    return out


def specialization(
    model: ModelLike,
    batches: Any,
    *,
    n_groups: int | None = None,
    layers: Iterable[int] | int | None = None,
    specialist_threshold: float = 0.5,
    generalist_threshold: float = 0.9,
    min_responsibility: float = 0.1,
) -> SpecializationResult:
    """Responsibility and value specialization per head over a stream of batches (one capture).

    Args:
        batches: a :class:`~bayesmanifold.hooks.Batch` with the label ``"group"``, a
            ``(tokens, groups)`` pair or ``(tokens, groups, attention_mask)`` triple, or a list of
            them; ``groups`` is Int[batch, pos] or Int[pos] (one label per query position, −1 to
            skip).
        n_groups: G (default: max label + 1 over the first batch).

    Example:
        >>> res = specialization(model, [(tokens, tokens % 4)], n_groups=4)  # doctest: +SKIP
    """
    access = model_access(model)
    layer_list = access.norm_layers(layers)
    items = _as_batches(model, batches)
    G = int(items[0].label("group").max()) + 1 if n_groups is None else int(n_groups)
    acc = SpecializationAccumulator(
        layer_list,
        access.n_heads,
        G,
        specialist_threshold=specialist_threshold,
        generalist_threshold=generalist_threshold,
        min_responsibility=min_responsibility,
    )
    for b in items:  # every batch checked before any forward pass
        _check_groups(b.label("group"), b.tokens.shape[0], b.tokens.shape[1], G, per_sequence=True)
    with capture(model, accumulators=[acc], layers=layer_list) as cap:
        for b in items:
            cap.run(b)
    return acc.finalize()
