"""The batch value: what one forward(+backward) pass of capture is about.

Every accumulator sees the batch it measures through ``bundle.batch``: the token ids, the padding
mask, the query positions that are scored (e.g. the value-prediction positions of a wind tunnel),
and per-sequence or per-position labels (Bayes entropy, group ids, scalars). One frozen value
replaces the ad-hoc ``(tokens, scalar, positions)`` tuples accumulators used to be fed.
"""

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Any

import numpy as np
import torch
from jaxtyping import Bool, Int
from torch import Tensor

from ..errors import InputError

__all__ = ["Batch", "Positions", "position_mask"]

Positions = int | str | Sequence[int] | Tensor | None


@dataclass(frozen=True, eq=False, kw_only=True)
class Batch:
    """One batch of token sequences and what travels with them.

    Attributes:
        tokens: token ids ``[batch, pos]``.
        attention_mask: 1 for real tokens, 0 for padding (left or right), or None.
        positions: ``Bool[batch, pos]``: the query positions a measurement scores (None: every
            real position).
        labels: per-sequence ``[batch]`` or per-position ``[batch, pos]`` tensors by name, e.g.
            ``{"bayes_entropy": ...}`` or ``{"group": ...}``.
    """

    tokens: Int[Tensor, "batch pos"]
    attention_mask: Int[Tensor, "batch pos"] | None = None
    positions: Bool[Tensor, "batch pos"] | None = None
    labels: Mapping[str, Tensor] = field(default_factory=dict)

    def __post_init__(self) -> None:
        t = self.tokens
        if not isinstance(t, Tensor) or t.ndim != 2 + int(t.is_floating_point()):
            got = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
            raise InputError(f"Batch.tokens must be token ids [batch, pos] (or float inputs [batch, pos, d]), got {got}")
        shape = tuple(t.shape[:2])
        for name in ("attention_mask", "positions"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, Tensor) or tuple(v.shape) != shape):
                got = tuple(v.shape) if isinstance(v, Tensor) else type(v).__name__
                raise InputError(f"Batch.{name} must have the tokens' shape {shape} (batch, pos), got {got}")
        if self.positions is not None and self.positions.dtype != torch.bool:
            raise InputError(f"Batch.positions must be a boolean mask, got dtype {self.positions.dtype}")
        for name, v in self.labels.items():
            if not isinstance(v, Tensor) or tuple(v.shape[:1]) != shape[:1]:
                got = tuple(v.shape) if isinstance(v, Tensor) else type(v).__name__
                raise InputError(f"Batch.labels[{name!r}] must be a tensor with {shape[0]} rows (one per sequence), got {got}")
        object.__setattr__(self, "labels", MappingProxyType(dict(self.labels)))

    @property
    def scored(self) -> Bool[Tensor, "batch pos"]:
        """The positions a measurement scores: ``positions`` and the real tokens (on CPU)."""
        valid = torch.ones(self.tokens.shape[:2], dtype=torch.bool)
        if self.attention_mask is not None:
            valid = self.attention_mask.detach().to("cpu").bool()
        if self.positions is None:
            return valid
        return self.positions.detach().to("cpu") & valid

    def label(self, name: str) -> Tensor:
        """The label ``name``; a clear error naming the labels this batch has."""
        if name not in self.labels:
            raise InputError(f"the batch has no label {name!r}; labels: {sorted(self.labels) or 'none'}")
        return self.labels[name]

    def to(self, device: str | torch.device) -> "Batch":
        """The same batch with tokens and masks on ``device`` (labels stay where they are)."""
        move = {
            k: getattr(self, k).to(device)
            for k in ("tokens", "attention_mask", "positions")
            if getattr(self, k) is not None
        }
        return replace(self, **move, labels=dict(self.labels))

    @classmethod
    def of(cls, item: Any, **kwargs: Any) -> "Batch":
        """A Batch from a Batch (returned as is) or token ids (``[batch, pos]`` or ``[pos]``)."""
        if isinstance(item, Batch):
            return item
        t = torch.as_tensor(item)
        if t.ndim == 1:
            t = t[None]
        return cls(tokens=t, **kwargs)


def position_mask(
    positions: Positions,
    batch: int,
    n_pos: int,
    attention_mask: Tensor | None = None,
) -> Bool[Tensor, "batch pos"]:
    """Turn a position selection into a boolean mask ``[batch, pos]`` on CPU.

    Accepted: ``None`` or ``"all"`` (every real position), ``"last"`` (the last real position of
    each row; with an attention mask, the last non-padded one), an int (negative counts from the
    end), a list of ints, an ``Int[batch]`` tensor (one position per row) or a ``Bool[batch, pos]``
    mask.
    """
    valid = torch.ones(batch, n_pos, dtype=torch.bool)
    if attention_mask is not None:
        valid = attention_mask.detach().to("cpu").bool()
    if positions is None or (isinstance(positions, str) and positions == "all"):
        return valid
    if isinstance(positions, str):
        if positions != "last":
            raise InputError(
                f"positions {positions!r} not understood: use 'last', 'all', an int, a list, "
                "an Int[batch] or Bool[batch, pos] tensor"
            )
        out = torch.zeros(batch, n_pos, dtype=torch.bool)
        idx = torch.arange(n_pos).expand(batch, n_pos)
        last = torch.where(valid, idx, torch.full_like(idx, -1)).max(dim=1).values
        if (last < 0).any():
            raise InputError("a row has no valid position (attention_mask all zero)")
        out[torch.arange(batch), last] = True
        return out
    if isinstance(positions, Tensor) and positions.dtype == torch.bool:
        if tuple(positions.shape) != (batch, n_pos):
            raise InputError(
                f"boolean positions mask must have shape (batch, pos)=({batch}, {n_pos}), got {tuple(positions.shape)}"
            )
        return positions.detach().to("cpu") & valid
    if isinstance(positions, Tensor) and positions.dim() == 1 and positions.shape[0] == batch and batch > 1:
        pos = positions.detach().to("cpu").long()
        if ((pos < -n_pos) | (pos >= n_pos)).any():
            raise InputError(f"per-row positions must lie in -{n_pos}..{n_pos - 1}")
        out = torch.zeros(batch, n_pos, dtype=torch.bool)
        out[torch.arange(batch), pos % n_pos] = True
        return out & valid
    if isinstance(positions, int | np.integer):
        positions = [int(positions)]
    pos_list = [int(p) for p in torch.as_tensor(positions).reshape(-1).tolist()]
    out = torch.zeros(batch, n_pos, dtype=torch.bool)
    for p in pos_list:
        if not -n_pos <= p < n_pos:
            raise InputError(f"position {p} out of range for sequences of length {n_pos}")
        out[:, p % n_pos] = True
    return out & valid
