"""The state of a user's model that decides whether a measurement can run or mean what it says.

:func:`check_materialised`: weights on PyTorch's ``meta`` device (shapes without data) cannot be
run; refused before any hook is attached. :func:`active_dropout`: whether a model would run with
active dropout: in train mode, with a dropout probability > 0.

With attention dropout active the pattern a hook sees is not the one multiplied into the values,
so the gradient laws (stated for z = α v) do not hold between the hooked tensors; a check must
say so instead of reporting bare failures. Pure torch: ``nn.Dropout`` modules and the
``attention_dropout`` / ``attn_dropout`` probabilities HuggingFace attention modules apply
functionally in train mode.
"""

from torch import nn

from ..errors import ModelError

__all__ = ["active_dropout", "check_materialised", "describe_active_dropout"]


def check_materialised(model: nn.Module) -> None:
    """Raise :class:`ModelError` if the model's weights are on the meta device (no data to run)."""
    meta = next((n for n, p in model.named_parameters() if p.is_meta), None)
    if meta is not None:
        raise ModelError(f"the model's weights are on the meta device (shapes only, no values; e.g. {meta}): "
                         "materialise them first (model.to_empty(device='cpu') and load a state dict, or load the model "
                         "without device='meta')")


def active_dropout(model: nn.Module) -> list[tuple[str, float]]:
    """``(module name, p)`` of every dropout that is active: the module is in train mode and p > 0."""
    out = []
    for name, m in model.named_modules():
        if not m.training:
            continue
        if isinstance(m, nn.modules.dropout._DropoutNd):
            p = float(m.p)
        else:
            p = next((float(v) for v in (getattr(m, "attention_dropout", None), getattr(m, "attn_dropout", None))
                      if isinstance(v, int | float) and not isinstance(v, bool)), 0.0)
        if p > 0:
            out.append((name or type(m).__name__, p))
    return out


def describe_active_dropout(model: nn.Module) -> str:
    """One sentence naming the active dropout, or '' when the model runs deterministically."""
    found = active_dropout(model)
    if not found:
        return ""
    shown = ", ".join(f"{n} (p={p:g})" for n, p in found[:3]) + (f" and {len(found) - 3} more" if len(found) > 3 else "")
    return (f"the model is in train mode with active dropout ({shown}): the hooked attention pattern is not the one "
            "applied to the values, so the laws cannot hold between the captured tensors; call model.eval() first")
