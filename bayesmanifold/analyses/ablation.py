"""Head ablation: how much a metric depends on each attention head.

Importance of head h in layer l = metric(model with h's output ablated) − metric(clean model),
one head at a time. The head's output (site ``z``) is replaced by zero or by its mean over the
batch and positions (``hooks.interventions.ablated_head``). The clean logits and the mean head
outputs come from one forward-only capture pass; each ablated run is a plain forward under
``no_grad`` inside the scoped intervention.
"""

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from jaxtyping import Int
from torch import Tensor

from ..backends import ModelLike, model_access
from ..errors import InputError
from ..hooks.bundle import LayerBundle, OutputBundle
from ..hooks.capture import capture
from ..hooks.interventions import ablated_head

__all__ = ["HeadAblationResult", "head_ablation"]


@dataclass(frozen=True, eq=False)
class HeadAblationResult:
    """Metric change when one head's output is ablated: ``delta[l, h] = metric_ablated − metric_clean``.

    Attributes:
        layers, heads: the rows' layers and the columns' heads.
        baseline: the clean metric.
        delta: [len(layers), len(heads)] change of the metric.
        mode: "zero" or "mean". metric_name: label of the metric.
    """

    layers: list[int]
    heads: list[int]
    baseline: float
    delta: np.ndarray
    mode: str
    metric_name: str = "loss"

    def to_dataframe(self):
        """One row per (layer, head)."""
        import pandas as pd

        return pd.DataFrame(
            [
                {"layer": layer, "head": h, "mode": self.mode, "metric": self.metric_name, "baseline": self.baseline, "delta": float(self.delta[i, j])}
                for i, layer in enumerate(self.layers)
                for j, h in enumerate(self.heads)
            ]
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "layers": [int(x) for x in self.layers],
            "heads": [int(x) for x in self.heads],
            "baseline": float(self.baseline),
            "delta": self.delta.tolist(),
            "mode": self.mode,
            "metric_name": self.metric_name,
        }

    def plot(self, ax=None):
        """Heat map of the metric change per (layer, head)."""
        import matplotlib.pyplot as plt

        if ax is None:
            _, ax = plt.subplots(figsize=(5, 3.5))
        im = ax.imshow(self.delta, aspect="auto", cmap="magma")
        ax.set_xticks(range(len(self.heads)), self.heads)
        ax.set_yticks(range(len(self.layers)), self.layers)
        ax.set_xlabel("head")
        ax.set_ylabel("layer")
        ax.figure.colorbar(im, ax=ax, label=f"Δ {self.metric_name}")
        ax.set_title(f"head importance ({self.mode}-ablation)", fontsize=9)
        return ax


class _CleanPass:
    """Forward-only: the clean logits and, for mean ablation, each layer's mean head output."""

    needs_gradients = False

    def __init__(self, mean_z: bool) -> None:
        self.sites = ("z",) if mean_z else ()
        self.mean_z: dict[int, Tensor] = {}
        self.logits: Tensor | None = None

    def update(self, bundle: LayerBundle) -> None:
        if self.sites:
            self.mean_z[bundle.layer] = bundle.acts["z"].mean((0, 1))  # [head, d_head]

    def update_output(self, out: OutputBundle) -> None:
        self.logits = out.logits

    def merge(self, other: Any) -> Any:
        raise InputError("the clean pass of head_ablation is one batch; it does not merge")

    def finalize(self) -> None:
        return None


def _mean_next_token_ce(logits: Tensor, tokens: Tensor) -> Tensor:
    """Mean next-token cross-entropy, in one ``F.cross_entropy`` call (the reduction order this
    measurement has always used, so float32 deltas stay bit-identical)."""
    lg = logits if logits.dtype in (torch.float32, torch.float64) else logits.float()
    return F.cross_entropy(lg[:, :-1].flatten(0, 1), tokens[:, 1:].flatten().to(logits.device))


def head_ablation(
    model: ModelLike,
    tokens: Int[Tensor, "batch pos"],
    *,
    mode: Literal["zero", "mean"] = "mean",
    metric: Callable[[Tensor, Tensor], Tensor] | None = None,
    metric_name: str = "loss",
    layers: Iterable[int] | int | None = None,
    heads: Iterable[int] | int | None = None,
) -> HeadAblationResult:
    """Importance of each head: metric(ablated) − metric(clean), one head at a time.

    Args:
        mode: "zero" (z_h := 0) or "mean" (z_h := its mean over batch and positions).
        metric: ``metric(logits, tokens) -> scalar``; default mean next-token cross-entropy. Any
            calibration error works too (e.g. a closure over a wind tunnel's Bayes posteriors).
        layers, heads: which (None: all).
    """
    access = model_access(model)
    if mode not in ("zero", "mean"):
        raise InputError(f"mode must be 'zero' or 'mean', got {mode!r}")
    toks = access.as_tokens(tokens).to(access.device)
    layer_list = access.norm_layers(layers)
    head_list = access.norm_heads(heads if heads is None or isinstance(heads, int) else list(heads), layer=layer_list[0])
    metric = metric or _mean_next_token_ce
    clean = _CleanPass(mean_z=mode == "mean")
    with capture(model, accumulators=[clean], layers=layer_list) as cap:
        cap.run(toks)
    base = float(metric(clean.logits, toks))
    delta = np.zeros((len(layer_list), len(head_list)))
    for i, layer in enumerate(layer_list):
        mean_z = clean.mean_z.get(layer)
        for j, h in enumerate(head_list):
            with torch.no_grad(), ablated_head(access.model, layer, h, replacement=None if mean_z is None else mean_z[h]):
                out = access.model(toks)
            delta[i, j] = float(metric(out, toks)) - base
    return HeadAblationResult(layers=layer_list, heads=head_list, baseline=base, delta=delta, mode=mode, metric_name=metric_name)
