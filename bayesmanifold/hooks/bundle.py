"""The values capture hands to measurements: one per attention layer, one per pass."""

from dataclasses import dataclass, field
from typing import Any, Protocol

from jaxtyping import Bool, Float
from torch import Tensor

from .batch import Batch

__all__ = ["LayerBundle", "OutputBundle", "Accumulator"]


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


