"""Mergeable per-(layer, head) running statistics, the storage behind streaming accumulators.

Each statistic is a float64 vector over a layer's selected heads with a reduction: ``sum``,
``max`` or ``min``. Two tables merge entry by entry, so a dataset processed in batches, or split
across processes, gives the same result as one pass.
"""

from collections.abc import Iterator

import torch
from torch import Tensor

from ..errors import InputError

__all__ = ["HeadStats"]

_REDUCE = {"sum": torch.add, "max": torch.maximum, "min": torch.minimum}


class HeadStats:
    """A table ``layer -> {name: Float64[head]}`` with a fixed reduction per name."""

    def __init__(self, kinds: dict[str, str]) -> None:
        bad = {k: v for k, v in kinds.items() if v not in _REDUCE}
        if bad:
            raise InputError(f"unknown reductions {bad}; accepted: {sorted(_REDUCE)}")
        self.kinds = dict(kinds)
        self.heads: dict[int, list[int]] = {}
        self.data: dict[int, dict[str, Tensor]] = {}

    def add(self, layer: int, heads: list[int], **values: Tensor) -> None:
        """Fold per-head values (any shape ``[head]``) for ``layer`` into the table."""
        if layer in self.heads and self.heads[layer] != heads:
            raise InputError(f"layer {layer}: heads {heads} differ from the heads seen before {self.heads[layer]}")
        self.heads[layer] = list(heads)
        row = self.data.setdefault(layer, {})
        for name, v in values.items():
            v = v.detach().to("cpu", torch.float64)
            row[name] = _REDUCE[self.kinds[name]](row[name], v) if name in row else v.clone()

    def merge(self, other: "HeadStats") -> "HeadStats":
        """Combine ``other`` into this table (in place) and return it."""
        if other.kinds != self.kinds:
            raise InputError("cannot merge statistics of different kinds")
        for layer, row in other.data.items():
            self.add(layer, other.heads[layer], **row)
        return self

    def rows(self) -> Iterator[tuple[int, int, dict[str, float]]]:
        """Yield ``(layer, head, {name: value})`` in layer then head order."""
        for layer in sorted(self.data):
            row = self.data[layer]
            for i, head in enumerate(self.heads[layer]):
                yield layer, head, {k: float(v[i]) for k, v in row.items()}

    def __bool__(self) -> bool:
        return bool(self.data)
