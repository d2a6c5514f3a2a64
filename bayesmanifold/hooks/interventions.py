"""Interventions on a model, each in one place: head ablation and one gradient step on a copy.

Both leave the user's model as found: ablation hooks are scoped to a ``with`` block and only ours
are removed; a gradient step is taken on a deep copy, never on the model itself.
"""

import contextlib
import copy
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, Literal

import torch
from torch import Tensor, nn

from ..backends import model_access
from ..errors import ConfigError, InputError
from .objectives import Objective, next_token_loss

__all__ = ["ablated_head", "parameter_names", "stepped_copy", "stepped_one_group_at_a_time"]

ParamKind = Literal["all", "qk", "values"]


def parameter_names(model: nn.Module, kind: ParamKind, layers: Sequence[int] | None = None) -> list[str]:
    """Names of the floating-point parameters of one kind: ``"all"``, attention ``"qk"`` or ``"values"``.

    ``layers`` restricts ``"qk"`` and ``"values"`` to those attention layers (None: all).
    """
    if kind not in ("all", "qk", "values"):
        raise ConfigError(f"parameter kind must be 'all', 'qk' or 'values', got {kind!r}")
    out = model_access(model).parameter_names(kind, layers)
    if not out:
        raise InputError(f"the model has no {kind} parameters in layers {layers if layers is not None else 'all'} to step")
    return out


def _copy_with_gradients(model: nn.Module, inputs: Any, lr: float, params: Sequence[str] | None,
                         objective: Objective | None, attention_mask: Tensor | None):
    """A deep copy of ``model``, the gradients of the objective with respect to its ``params``, and the loss."""
    if not (isinstance(lr, int | float) and lr > 0 and lr < float("inf")):
        raise ConfigError(f"lr must be a positive finite number, got {lr!r}")
    access = model_access(model)
    batch = access.prepare_batch(inputs, attention_mask)
    objective = objective or next_token_loss(batch.attention_mask)
    # Activations a module caches from its last forward (a TransformerBridge keeps its attention's
    # pre-norm residual) are not weights, and deepcopy refuses non-leaf tensors: the copy gets None.
    memo: dict[int, Any] = {id(v): None for m in model.modules() for v in vars(m).values()
                            if isinstance(v, Tensor) and v.grad_fn is not None}
    new = copy.deepcopy(model, memo)
    named = dict(new.named_parameters())
    chosen = list(named) if params is None else list(params)
    missing = [n for n in chosen if n not in named]
    if missing:
        raise InputError(f"the model has no parameters {missing[:3]}")
    for n, p in named.items():
        p.requires_grad_(n in chosen)
        p.grad = None
    kw = {} if batch.attention_mask is None else {"attention_mask": batch.attention_mask}
    with torch.enable_grad():
        loss = objective(new(batch.tokens, **kw), batch.tokens)
        grads = torch.autograd.grad(loss, [named[n] for n in chosen], allow_unused=True)
    return new, named, chosen, grads, loss


def stepped_one_group_at_a_time(
    model: nn.Module,
    inputs: Any,
    *,
    lr: float,
    groups: Mapping[Any, Sequence[str]],
    objective: Objective | None = None,
    attention_mask: Tensor | None = None,
) -> Iterator[tuple[Any, nn.Module]]:
    """For each group of parameter names, a copy of ``model`` after one gradient-descent step on
    that group alone (``p ← p − lr·∂L/∂p``), in turn.

    One deep copy and one backward pass serve every group (a parameter's gradient does not depend
    on which others are stepped): each group's step is applied, the copy yielded, and the step
    undone before the next. Equal to :func:`stepped_copy` per group, at the cost of one copy.
    """
    union = list(dict.fromkeys(n for names in groups.values() for n in names))
    new, named, chosen, grads, _ = _copy_with_gradients(model, inputs, lr, union, objective, attention_mask)
    grad_of = dict(zip(chosen, grads))
    for key, names in groups.items():
        saved = {n: named[n].detach().clone() for n in names if grad_of.get(n) is not None}
        with torch.no_grad():
            for n in saved:
                named[n].sub_(lr * grad_of[n])
        try:
            yield key, new
        finally:
            with torch.no_grad():
                for n, value in saved.items():
                    named[n].copy_(value)


def stepped_copy(
    model: nn.Module,
    inputs: Any,
    *,
    lr: float,
    params: Sequence[str] | None = None,
    objective: Objective | None = None,
    attention_mask: Tensor | None = None,
    optimizer_factory: Callable[[list[Tensor]], torch.optim.Optimizer] | None = None,
) -> tuple[nn.Module, float]:
    """A deep copy of ``model`` after one optimiser step on ``params`` (names; None: all).

    The default step is plain gradient descent ``p ← p − lr·∂L/∂p``. Returns the stepped copy and
    the objective's value before the step.
    """
    new, named, chosen, grads, loss = _copy_with_gradients(model, inputs, lr, params, objective, attention_mask)
    if optimizer_factory is None:
        with torch.no_grad():
            for n, g in zip(chosen, grads):
                if g is not None:
                    named[n].sub_(lr * g)
    else:
        ps = [named[n] for n in chosen]
        for p, g in zip(ps, grads):
            p.grad = g
        optimizer_factory(ps).step()
        for p in ps:
            p.grad = None
    return new, float(loss.detach())


@contextlib.contextmanager
def ablated_head(
    model: nn.Module, layer: int, head: int, *, replacement: Tensor | None = None
) -> Iterator[None]:
    """Inside the block, head ``head`` of ``layer`` outputs ``replacement`` (``[d_head]``) or zero.

    The hook returns a new tensor (it never writes into the model's); only this hook is removed on
    exit.
    """

    def hook(module: nn.Module, inp: Any, z: Tensor) -> Tensor:
        z = z.clone()
        z[:, :, head] = 0.0 if replacement is None else replacement
        return z

    handle = model_access(model).add_forward_hook("z", layer, hook)
    try:
        yield
    finally:
        handle.remove()
