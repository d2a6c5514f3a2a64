"""Small scoping helpers of the capture pass: frozen weights for one forward, bound callbacks."""

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from torch import nn

__all__ = ["weights_frozen", "bind"]


@contextmanager
def weights_frozen(model: nn.Module) -> Iterator[None]:
    """Parameters do not require gradients for the duration (restored after, even on error).

    Capture differentiates with respect to the embedding output only, so weight gradients are never
    computed; with the weights frozen autograd also does not save the activations it would need
    for them (the input of every linear layer), which is most of the memory above the floor.
    """
    thawed = [p for p in model.parameters() if p.requires_grad]
    try:
        for p in thawed:
            p.requires_grad_(False)
        yield
    finally:
        for p in thawed:
            p.requires_grad_(True)


def bind(fn: Callable, *args: Any) -> Callable:
    def bound(*rest: Any) -> Any:
        return fn(*args, *rest)

    return bound
