"""Representations at the scored positions, collected on capture and fed to the value-manifold PCA.

Paper I (arXiv 2512.22471) reads the manifold off the final-layer representations at the
prediction positions; Paper III (arXiv 2512.23752) off the standardised concatenated per-head
values at the final token. :class:`FeatureAccumulator` is the capture accumulator that collects
either, per batch and in one forward-only pass:

- ``"values"``: one head's value vectors (site ``v``; under GQA the kv head that query head reads);
- ``"values_concat"``: the layer's value vectors over its kv heads concatenated (under GQA the
  n_kv distinct vectors, not the n_heads expanded copies);
- ``"head_outputs"``: site ``z``, one head or all heads concatenated;
- ``"residual"``: site ``resid_post`` of the layer.

Rows are taken at the batch's scored positions (``batch.scored``: ``batch.positions`` and the real
tokens) in row-major (batch, pos) order, with a per-sample scalar from ``batch.labels[label]``
(per position ``[batch, pos]`` or per sequence ``[batch]``) or computed from the logits of the
same pass (``output_scalar``). :func:`collect_features` and :func:`value_manifold` are the
one-call forms.
"""

from collections.abc import Callable, Iterable
from dataclasses import replace
from typing import Any, Literal

import numpy as np
import torch
from jaxtyping import Float, Int
from torch import Tensor

from ..backends import ModelLike, model_access
from ..backends.batch import Batch, Positions, position_mask
from ..errors import InputError
from ..hooks.bundle import LayerBundle, OutputBundle
from ..hooks.capture import capture
from .manifold import ManifoldAccumulator, ManifoldResult

__all__ = ["FeatureKind", "FeatureAccumulator", "collect_features", "value_manifold", "describe_features",
           "next_token_entropy"]

FeatureKind = Literal["values", "values_concat", "head_outputs", "residual"]
_SITE = {"values": "v", "values_concat": "v", "head_outputs": "z", "residual": "resid_post"}
# The label a tuple item's scalar travels under once it is a Batch.
_SCALAR = "scalar"


def _check_kind(kind: str) -> None:
    if kind not in _SITE:
        raise InputError(f"feature kind {kind!r} not known: use 'values', 'values_concat', 'head_outputs' or 'residual'")


def next_token_entropy(out: OutputBundle) -> Tensor:
    """Entropy (nats, float64) of the next-token distribution at the pass's scored positions
    (``out.batch.scored``), as ``[batch, pos]`` with NaN elsewhere; usable as a
    :class:`FeatureAccumulator`'s ``output_scalar``.

    Only the scored rows of the logits are normalised (a vocabulary of 49,152 over every position
    of a padded batch is otherwise most of a forward-only pass), and the value is computed once
    per pass however many accumulators ask for it: it is kept on the pass's :class:`OutputBundle`
    (which capture hands every accumulator), so nothing outlives the pass."""
    memo = out.__dict__.setdefault("_derived", {})
    got = memo.get("next_token_entropy")
    if got is not None and got[0] is out.logits:
        return got[1]
    mask = out.batch.scored.to(out.logits.device)
    lp = torch.log_softmax(out.logits[mask].double(), -1)
    value = torch.full(mask.shape, float("nan"), dtype=torch.float64)
    value[mask.cpu()] = -(lp.exp() * lp).sum(-1).cpu()
    memo["next_token_entropy"] = (out.logits, value)
    return value


def _label_rows(label: Tensor, mask: Tensor) -> Tensor:
    """A per-position ``[batch, pos]`` or per-sequence ``[batch]`` label at the mask's positions."""
    lab = label.detach().to("cpu", torch.float64)
    if lab.dim() == 1:
        lab = lab[:, None].expand(mask.shape)
    elif lab.dim() != 2 or tuple(lab.shape) != tuple(mask.shape):
        raise InputError(f"a scalar label must be [batch] or [batch, pos]={tuple(mask.shape)}, got shape {tuple(label.shape)}")
    return lab[mask]


class FeatureAccumulator:
    """Collects one layer's features at the scored positions of every batch (forward-only).

    Args:
        kind: which representation (see the module docstring).
        layer: the layer (an index as the bundles carry it, i.e. non-negative).
        head: the query head for ``"values"`` (default 0) and ``"head_outputs"`` (None: all heads).
        label: name of the per-sample scalar in ``batch.labels`` (None: no scalar, unless
            ``output_scalar`` is given).
        require_label: a batch without ``label`` is an error (False: its rows get no scalar).
        output_scalar: ``fn(out: OutputBundle) -> Float[batch, pos] or Float[batch]``, the scalar
            from the pass's logits (e.g. next-token entropy); rows wait for it until the pass ends.
        pca: a :class:`ManifoldAccumulator` the rows stream into (then :meth:`finalize` returns its
            :class:`ManifoldResult`); None keeps the rows in :attr:`features` instead.
        dtype: the rows' dtype on CPU (float32 as the value-manifold has always used).

    Example:
        >>> acc = FeatureAccumulator(kind="residual", layer=1, pca=ManifoldAccumulator())  # doctest: +SKIP
        >>> with capture(model, accumulators=[acc], layers=1) as cap:  # doctest: +SKIP
        ...     cap.run(Batch(tokens=toks, positions=mask, labels={"scalar": h}))
        >>> acc.finalize().pc1_share  # doctest: +SKIP
    """

    needs_gradients = False

    def __init__(
        self,
        *,
        kind: FeatureKind = "values_concat",
        layer: int,
        head: int | None = None,
        label: str | None = None,
        require_label: bool = True,
        output_scalar: Callable[[OutputBundle], Tensor] | None = None,
        pca: ManifoldAccumulator | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        _check_kind(kind)
        if label is not None and output_scalar is not None:
            raise InputError("give the scalar either as a batch label or as output_scalar, not both")
        self.kind, self.layer, self.label, self.output_scalar = kind, int(layer), label, output_scalar
        self.require_label = require_label
        self.head = 0 if kind == "values" and head is None else head
        self.sites = (_SITE[kind],)
        self.pca, self.dtype = pca, dtype
        self.rows: list[Tensor] = []
        self.scalars: list[Tensor] = []
        self._pending: list[tuple[Tensor, Tensor]] = []

    def extract(self, bundle: LayerBundle) -> tuple[Float[Tensor, "sample feature"], Tensor]:
        """The rows of this bundle at ``batch.scored`` and that mask (CPU)."""
        act = bundle.acts[self.sites[0]].to("cpu", self.dtype)
        if self.kind == "values":
            act = act[:, :, self.head // (bundle.n_heads // bundle.n_kv_heads)]
        elif self.kind == "head_outputs" and self.head is not None:
            act = act[:, :, self.head]
        elif act.dim() == 4:
            act = act.flatten(2)
        mask = bundle.batch.scored if bundle.batch is not None else torch.ones(act.shape[:2], dtype=torch.bool)
        return act[mask], mask

    def update(self, bundle: LayerBundle) -> None:
        if bundle.layer != self.layer:
            return
        feats, mask = self.extract(bundle)
        if self.output_scalar is not None:
            self._pending.append((feats, mask))
            return
        scalar = None
        if self.label is not None and (self.require_label or self.label in bundle.batch.labels):
            scalar = _label_rows(bundle.batch.label(self.label), mask)
        self._add(feats, scalar)

    def update_output(self, out: OutputBundle) -> None:
        if self.output_scalar is None:
            return
        pending, self._pending = self._pending, []
        if pending:
            value = self.output_scalar(out)
            for feats, mask in pending:
                self._add(feats, _label_rows(value, mask))

    def _add(self, feats: Tensor, scalar: Tensor | None) -> None:
        if self.pca is not None:
            self.pca.update(feats, scalar)
        else:
            self.rows.append(feats)
            if scalar is not None:
                self.scalars.append(scalar)

    @property
    def features(self) -> Float[Tensor, "sample feature"]:
        """The collected rows (when no ``pca`` was given)."""
        if not self.rows:
            raise InputError("no features were collected: run a batch through capture first (or read the PCA)")
        return torch.cat(self.rows)

    def merge(self, other: "FeatureAccumulator") -> "FeatureAccumulator":
        if (other.kind, other.layer, other.head) != (self.kind, self.layer, self.head):
            raise InputError("cannot merge feature accumulators of different kinds, layers or heads")
        if self.pca is not None and other.pca is not None:
            self.pca.merge(other.pca)
        self.rows = self.rows + other.rows
        self.scalars = self.scalars + other.scalars
        return self

    def finalize(self) -> ManifoldResult:
        """The PCA's result (needs ``pca``)."""
        if self.pca is None:
            raise InputError("this FeatureAccumulator has no pca: read .features, or pass pca=ManifoldAccumulator()")
        return self.pca.finalize()


def describe_features(model: ModelLike, kind: FeatureKind, layer: int, head: int | None) -> str:
    """A readable label: which representation, layer and head."""
    _check_kind(kind)
    acc = model_access(model)
    layer = acc.norm_layers(layer)[0]
    if kind == "values":
        h = 0 if head is None else head
        extra = f" (kv head {acc.kv_of_head(h)})" if acc.n_kv_heads != acc.n_heads else ""
        return f"values (hook_v) layer {layer} head {h}{extra}"
    if kind == "values_concat":
        return f"values (hook_v) layer {layer}, {acc.n_kv_heads} kv heads concatenated"
    if kind == "head_outputs":
        return f"head outputs (hook_z) layer {layer}" + (f" head {head}" if head is not None else ", heads concatenated")
    return f"residual stream (hook_resid_post) layer {layer}"


def _layer_head(access: Any, kind: str, layer: int, head: int | None) -> tuple[int, int | None]:
    _check_kind(kind)
    layer = access.norm_layers(layer)[0]
    if kind == "values":
        head = access.norm_heads(0 if head is None else head, layer=layer)[0]
    elif kind == "head_outputs" and head is not None:
        head = access.norm_heads(head, layer=layer)[0]
    return layer, head


def collect_features(
    model: ModelLike,
    tokens: Int[Tensor, "batch pos"],
    *,
    kind: FeatureKind = "values_concat",
    layer: int = -1,
    head: int | None = None,
    positions: Positions = "last",
    attention_mask: Int[Tensor, "batch pos"] | None = None,
) -> Float[Tensor, "sample feature"]:
    """Features at the selected positions of one batch, in row-major (batch, pos) order.

    Args:
        model: a HookedTransformer.
        tokens: token ids.
        kind: ``"values"``, ``"values_concat"``, ``"head_outputs"`` or ``"residual"`` (module docstring).
        layer: layer index (negative counts from the end).
        head: query head for ``"values"`` / ``"head_outputs"``.
        positions: see :func:`bayesmanifold.backends.batch.position_mask` ("last", "all", int, list,
            Int[batch], Bool[batch, pos]).
        attention_mask: optional padding mask (1 = real token).

    Returns:
        Float[sample, feature] on CPU (float32).
    """
    access = model_access(model)
    layer, head = _layer_head(access, kind, layer, head)
    toks = access.as_tokens(tokens)
    mask = position_mask(positions, toks.shape[0], toks.shape[1], attention_mask)
    acc = FeatureAccumulator(kind=kind, layer=layer, head=head)
    with capture(model, accumulators=[acc], layers=[layer]) as cap:
        cap.run(Batch(tokens=toks, attention_mask=attention_mask, positions=mask))
    return acc.features


def _as_batch(access: Any, item: Any, positions: Positions, scalar_fn: Callable | None, label: str | None) -> Batch:
    """A Batch from a Batch, token ids, ``(tokens, scalar)`` or ``(tokens, scalar, positions)``."""
    scalar = None
    if isinstance(item, Batch):
        batch = item
        if batch.positions is None:
            mask = position_mask(positions, *batch.tokens.shape[:2], batch.attention_mask)
            batch = replace(batch, positions=mask, labels=dict(batch.labels))
        toks = batch.tokens
    else:
        pos = positions
        if isinstance(item, tuple | list):
            toks = item[0]
            scalar = item[1] if len(item) > 1 else None
            pos = item[2] if len(item) > 2 else positions
        else:
            toks = item
        toks = access.as_tokens(toks)
        batch = Batch(tokens=toks, positions=position_mask(pos, toks.shape[0], toks.shape[1]))
    mask = batch.scored
    key = label or _SCALAR
    if scalar is None and scalar_fn is not None and key not in batch.labels:
        scalar = scalar_fn(toks.cpu(), mask)
    if scalar is None:
        return batch
    s = torch.as_tensor(np.asarray(scalar) if not isinstance(scalar, Tensor) else scalar).detach()
    s = s.to("cpu", torch.float64).reshape(-1)
    n = int(mask.sum())
    if s.shape[0] != n:
        raise InputError(f"scalar has {s.shape[0]} entries but features have {n} samples (one per selected position)")
    lab = torch.full(mask.shape, float("nan"), dtype=torch.float64)
    lab[mask] = s
    return replace(batch, labels={**batch.labels, key: lab})


def value_manifold(
    model: ModelLike,
    batches: Iterable[Any],
    *,
    kind: FeatureKind = "values_concat",
    layer: int = -1,
    head: int | None = None,
    positions: Positions = "last",
    standardize: bool = True,
    scalar_fn: Callable[[Tensor, Tensor], Tensor] | None = None,
    scalar_name: str = "scalar",
    label: str | None = None,
) -> ManifoldResult:
    """Stream batches through the model (one forward-only pass each), collect features, run the PCA.

    Args:
        batches: an iterable of :class:`~bayesmanifold.backends.batch.Batch` values (the scalar is
            ``batch.labels[label]``; without ``batch.positions``, ``positions`` applies), of token
            tensors, of ``(tokens, scalar)`` pairs where ``scalar`` is one number per selected
            position (row-major order), or of ``(tokens, scalar, positions)`` triples.
        scalar_fn: alternatively ``scalar_fn(tokens, mask) -> Float[n]`` giving the scalar for the
            selected positions (mask is the Bool[batch, pos] selection).
        label: the label of Batch items that holds the scalar (default: none, or the scalar of
            tuple items / ``scalar_fn``).
        Other args: as in :func:`collect_features`.

    Example:
        >>> res = value_manifold(model, [toks], kind="residual", positions="last")  # doctest: +SKIP
    """
    access = model_access(model)
    lay, hd = _layer_head(access, kind, layer, head)
    pca = ManifoldAccumulator(
        standardize=standardize, feature_kind=describe_features(model, kind, layer, head), scalar_name=scalar_name
    )
    acc = FeatureAccumulator(kind=kind, layer=lay, head=hd, label=label or _SCALAR, require_label=label is not None, pca=pca)
    with capture(model, accumulators=[acc], layers=[lay]) as cap:
        for item in batches:
            cap.run(_as_batch(access, item, positions, scalar_fn, label))
    return acc.finalize()
