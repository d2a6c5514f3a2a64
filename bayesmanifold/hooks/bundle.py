"""The values capture hands to measurements: one per attention layer, one per pass."""

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

import torch
from jaxtyping import Bool, Float
from torch import Tensor

from ..backends.base import ATTN_SITES, BLOCK_SITES, MODEL_SITES
from ..backends.batch import Batch
from ..errors import InputError, SelectionError

__all__ = ["LayerBundle", "OutputBundle", "Accumulator", "layer_masks", "plan_accumulators"]


@dataclass(eq=False)
class LayerBundle:
    """Everything one attention layer contributes to the measurements, for one batch.

    Dimension ``head`` indexes the selected query heads (``heads``). In a forward-only capture the
    gradient fields are ``None``. Entries of ``grad_pattern`` outside ``valid`` are not meaningful
    (autograd's ∂L/∂α is u·v there, though α is 0). ``acts`` holds the extra sites asked for
    (``"scores"``, ``"z"``, ``"q"``, ``"k"``, ``"resid_pre"``, ``"resid_post"``), all heads,
    detached.
    """

    layer: int
    heads: list[int]
    kv_heads: list[int]
    attn_scale: float | None
    pattern: Float[Tensor, "batch head query_pos key_pos"]
    values: Float[Tensor, "batch key_pos head d_head"]
    grad_z: Float[Tensor, "batch query_pos head d_head"] | None
    grad_pattern: Float[Tensor, "batch head query_pos key_pos"] | None
    grad_scores: Float[Tensor, "batch head query_pos key_pos"] | None
    grad_values: Float[Tensor, "batch key_pos kv_head d_head"] | None
    valid: Bool[Tensor, "batch query_pos key_pos"]
    query_valid: Bool[Tensor, "batch query_pos"]
    n_heads: int = 0
    n_kv_heads: int = 0
    batch: Batch | None = None
    acts: dict[str, Tensor] = field(default_factory=dict)
    #: The dtype the softmax was taken in when it differs from the tensors' (e.g. float32 in
    #: HuggingFace's Llama-family attention): the laws then hold only to its precision.
    softmax_dtype: torch.dtype | None = None

    @property
    def has_gradients(self) -> bool:
        return self.grad_scores is not None

    @property
    def group_complete(self) -> list[bool]:
        """Per kv head of ``grad_values``: whether every query head of its group is selected.

        The autograd value gradient of a shared kv head sums over its whole group, so the value
        law can only be checked on kv heads whose group is complete.
        """
        group = self.n_heads // self.n_kv_heads
        selected = set(self.heads)
        return [all(g * group + i in selected for i in range(group)) for g in range(self.n_kv_heads)]


    def sliced(
        self, query_positions: slice | Sequence[int] | None = None, device: torch.device | None = None
    ) -> "LayerBundle":
        """A copy restricted to ``query_positions`` (slice or indices) and moved to ``device``."""
        qp = query_positions

        def q(t: Tensor | None, dim: int | None) -> Tensor | None:
            if t is None:
                return None
            if dim is not None and isinstance(qp, slice):
                t = t[(slice(None),) * dim + (qp,)].clone()
            elif dim is not None and qp is not None:
                t = t.index_select(dim, torch.as_tensor(list(qp), dtype=torch.long, device=t.device))
            return t.to(device) if device is not None else t

        return replace(
            self,
            pattern=q(self.pattern, 2),
            grad_pattern=q(self.grad_pattern, 2),
            grad_scores=q(self.grad_scores, 2),
            grad_z=q(self.grad_z, 1),
            valid=q(self.valid, 1),
            query_valid=q(self.query_valid, 1),
            values=q(self.values, None),
            grad_values=q(self.grad_values, None),
            acts={k: q(v, None) for k, v in self.acts.items()},
        )


@dataclass(eq=False)
class OutputBundle:
    """What a pass produced at the model's output: logits, the objective's value, model-level sites."""

    batch: Batch
    logits: Float[Tensor, "batch pos vocab"]
    loss: float | None
    acts: dict[str, Tensor] = field(default_factory=dict)


class Accumulator(Protocol):
    """What capture hands each layer's bundle to (mergeable streaming statistics).

    Optional attributes: ``needs_gradients`` (default True: a backward pass is run), ``sites``
    (extra sites wanted in ``bundle.acts``), and ``update_output(out: OutputBundle)`` for
    measurements of the logits or the final residual stream.
    """

    def update(self, bundle: LayerBundle) -> None: ...

    def merge(self, other: Any) -> Any: ...

    def finalize(self) -> Any: ...




def layer_masks(valid: Tensor, attention_mask: Tensor | None,
                last: tuple[Tensor, Tensor] | None) -> tuple[Tensor, Tensor]:
    """A layer's ``(valid, query_valid)``: the earlier layer's objects (``last``) when its mask is
    equal, so that what measurements derive from masks (tiles, entry masks, counts) is made once
    per pass; else ``valid`` with its query rows that attend somewhere and are not padding."""
    if last is not None and last[0].shape == valid.shape and torch.equal(last[0], valid):
        return last
    query_valid = valid.any(dim=-1)
    if attention_mask is not None:
        query_valid = query_valid & attention_mask.bool()
    return valid, query_valid


def plan_accumulators(
    accumulators: Any, gradients: bool | None, sites: Iterable[str]
) -> tuple[list[Any], bool, set[str]]:
    """Check accumulators and decide what a capture must do for them.

    Returns the accumulators as a list, whether to run the backward pass (``gradients`` if given;
    else True when any accumulator needs gradients, its ``needs_gradients`` defaulting to True, or
    when there is none), and the extra sites to deliver (``sites`` plus the accumulators' own).
    """
    if accumulators is None or isinstance(accumulators, str) or not isinstance(accumulators, Iterable) or hasattr(accumulators, "update"):
        raise InputError(
            f"accumulators must be a list of objects with update(bundle), got {type(accumulators).__name__}"
        )
    accs = list(accumulators)
    for acc in accs:
        if not callable(getattr(acc, "update", None)):
            raise InputError(f"accumulator {type(acc).__name__} has no update(bundle) method")
    needs = [bool(getattr(acc, "needs_gradients", True)) for acc in accs]
    run_backward = bool(gradients) if gradients is not None else (not needs or any(needs))
    if not run_backward and any(needs):
        names = [type(a).__name__ for a, n in zip(accs, needs) if n]
        raise InputError(f"gradients=False, but {', '.join(names)} need the backward pass")
    wanted = set(sites)
    for acc in accs:
        wanted |= set(getattr(acc, "sites", ()))
    known = set(ATTN_SITES + BLOCK_SITES + MODEL_SITES)
    if wanted - known:
        raise SelectionError(f"unknown sites {sorted(wanted - known)}; accepted: {', '.join(sorted(known))}")
    return accs, run_backward, wanted
