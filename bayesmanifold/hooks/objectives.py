"""Scalar objectives whose gradient capture follows, and their validation.

Any ``fn(logits, inputs) -> scalar tensor`` is an objective: the next-token loss (default), the
loss at chosen positions only, a logit difference, a cross-entropy against custom targets.
"""

from collections.abc import Callable, Sequence
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor

from ..errors import ObjectiveError

__all__ = ["Objective", "next_token_loss", "loss_at_positions", "logit_difference", "validate_objective_value"]

Objective = Callable[[Tensor, Any], Tensor]


def _per_token_ce(logits: Float[Tensor, "batch pos vocab"], tokens: Int[Tensor, "batch pos"]) -> Tensor:
    # log-softmax over the whole tensor, then the next tokens picked out: the same numbers as
    # cross_entropy on logits[:, :-1] without copying that non-contiguous slice (batch × pos × vocab)
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    logp = logits.log_softmax(-1)[:, :-1]
    return -logp.gather(-1, tokens[:, 1:, None].to(device=logp.device, dtype=torch.long)).squeeze(-1)


def next_token_loss(attention_mask: Tensor | None = None) -> Objective:
    """Mean next-token cross-entropy; with a mask, over pairs whose both tokens are real."""

    def objective(logits: Tensor, tokens: Tensor) -> Tensor:
        ce = _per_token_ce(logits, tokens)
        if attention_mask is None:
            return ce.mean()
        m = (attention_mask[:, :-1].bool() & attention_mask[:, 1:].bool()).to(ce.dtype)
        if m.sum() == 0:
            raise ObjectiveError("the attention mask leaves no pair of consecutive real tokens to predict")
        return (ce * m).sum() / m.sum()

    return objective


def loss_at_positions(positions: int | Sequence[int]) -> Objective:
    """Next-token cross-entropy of the predictions made at ``positions`` only (mean).

    Position p predicts token p+1, so p must be < pos-1.
    """
    pos = [positions] if isinstance(positions, int) else list(positions)

    def objective(logits: Tensor, tokens: Tensor) -> Tensor:
        n = tokens.shape[1]
        bad = [p for p in pos if not -n + 1 <= p < n - 1]
        if bad:
            raise ObjectiveError(f"positions {bad} have no next token to predict; accepted: 0..{n - 2}")
        ce = _per_token_ce(logits, tokens)
        return ce[:, [p % n for p in pos]].mean()

    return objective


def logit_difference(good: int, bad: int, position: int = -1) -> Objective:
    """Mean over the batch of logit[good] − logit[bad] at ``position`` (a classic probe objective)."""

    def objective(logits: Tensor, tokens: Tensor) -> Tensor:
        return (logits[:, position, good] - logits[:, position, bad]).mean()

    return objective


def validate_objective_value(value: Any) -> None:
    """Raise :class:`ObjectiveError` unless ``value`` is a finite scalar with a gradient path."""
    if not isinstance(value, Tensor):
        raise ObjectiveError(f"the objective must return a scalar tensor, got {type(value).__name__}")
    if value.numel() != 1:
        raise ObjectiveError(f"the objective must return a scalar, got a tensor of shape {tuple(value.shape)}")
    if not torch.is_floating_point(value):
        raise ObjectiveError(f"the objective must be a floating-point scalar, got dtype {value.dtype}")
    if not value.requires_grad:
        raise ObjectiveError("the objective has no gradient path (it does not depend on the model's output)")
    if not bool(torch.isfinite(value.detach()).all()):
        raise ObjectiveError(f"the objective is not finite ({float(value.detach())})")
