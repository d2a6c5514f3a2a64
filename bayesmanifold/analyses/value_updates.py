"""Value-update alignment: does one optimizer step move each value along −η Σ_i α_ij u_i?

Paper II (arXiv 2512.22473, PAPERS.md §2) reads the value update Δv_j = −η Σ_i α_ij u_i as the
M-step of an EM-like loop: each value is pulled towards the negative error signals of the queries
that use it, weighted by their responsibility α_ij. :func:`value_update_alignment` measures, per
layer and kv head, the cosine between the observed change of every value vector after one
optimizer step (on a deep copy; same inputs before/after) and that prediction, read from
:func:`bayesmanifold.hooks.capture` (∂L/∂v). Under GQA the value vectors are per kv head; the
prediction sums the query heads of the group, as autograd does.
"""

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from jaxtyping import Int
from torch import Tensor

from ..backends import ModelLike, model_access
from ..errors import ConfigError, InputError
from ..hooks import LayerBundle, capture, next_token_loss
from ..hooks.interventions import parameter_names, stepped_copy

__all__ = ["ValueUpdateAlignmentResult", "value_update_alignment"]


def check_lr(lr: Any, name: str = "lr") -> None:
    """A step size must be a positive finite number (checked before any pass)."""
    if isinstance(lr, bool) or not isinstance(lr, int | float) or not 0 < lr < float("inf"):
        raise ConfigError(f"{name} must be a positive finite number, got {lr!r}")


def kept_bundles(
    model: ModelLike,
    batch: Any,
    layers: list[int],
    *,
    objective: Callable | None = None,
    gradients: bool = True,
    sites: tuple[str, ...] = (),
) -> dict[int, LayerBundle]:
    """Every selected layer's bundle of one capture pass (kept on the CPU)."""
    with capture(model, layers=layers, keep=True, keep_device="cpu", objective=objective, gradients=gradients, sites=sites) as cap:
        cap.run(batch)
        return dict(cap.kept)


@dataclass(frozen=True, eq=False)
class ValueUpdateAlignmentResult:
    """Cosine between the observed value change and −η Σ_i α_ij u_i, per layer and kv head.

    Attributes:
        cosine: [layers, kv_heads] cosine over all (batch, key_pos, d_head) entries at once.
        mean_vector_cosine: [layers, kv_heads] mean over value vectors of the per-vector cosine.
        relative_change: [layers, kv_heads] ‖Δv‖/‖v‖.
        params: which parameters were stepped ("all" or "values").
    """

    layers: list[int]
    cosine: np.ndarray
    mean_vector_cosine: np.ndarray
    relative_change: np.ndarray
    lr: float
    params: str

    def to_dataframe(self):
        """Tidy: one row per (layer, kv head)."""
        import pandas as pd

        return pd.DataFrame(
            [
                {
                    "layer": layer,
                    "kv_head": h,
                    "cosine": float(self.cosine[i, h]),
                    "mean_vector_cosine": float(self.mean_vector_cosine[i, h]),
                    "relative_change": float(self.relative_change[i, h]),
                    "params": self.params,
                }
                for i, layer in enumerate(self.layers)
                for h in range(self.cosine.shape[1])
            ]
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe: every field as plain lists (NaN stays a float)."""
        return {
            "layers": [int(x) for x in self.layers],
            "cosine": np.asarray(self.cosine, dtype=float).tolist(),
            "mean_vector_cosine": np.asarray(self.mean_vector_cosine, dtype=float).tolist(),
            "relative_change": np.asarray(self.relative_change, dtype=float).tolist(),
            "lr": float(self.lr),
            "params": self.params,
        }

    def plot(self, ax=None):
        """Heatmap of the cosine per layer and kv head."""
        import matplotlib.pyplot as plt

        if ax is None:
            _, ax = plt.subplots(figsize=(5, 3.5))
        im = ax.imshow(self.cosine, aspect="auto", vmin=-1, vmax=1, cmap="RdBu")
        ax.set_yticks(range(len(self.layers)), self.layers)
        ax.set_xlabel("kv head")
        ax.set_ylabel("layer")
        ax.figure.colorbar(im, ax=ax, label="cos(Δv observed, −η Σ α u)")
        ax.set_title(f"value-update alignment (step on {self.params} params)", fontsize=9)
        return ax


def value_update_alignment(
    model: ModelLike,
    tokens: Int[Tensor, "batch pos"],
    *,
    lr: float = 1e-2,
    params: Literal["all", "values"] = "all",
    optimizer_factory: Callable | None = None,
    objective: Callable[[Tensor, Tensor], Tensor] | None = None,
    attention_mask: Tensor | None = None,
    layers: Iterable[int] | int | None = None,
) -> ValueUpdateAlignmentResult:
    """Does one optimizer step move each value along −η Σ_i α_ij u_i? (Paper II's M-step.)

    The model is deep-copied and one step taken on the copy (plain gradient descent with ``lr``
    unless ``optimizer_factory(params) -> optimizer`` is given); the user's model is not changed.
    With ``params="values"`` only W_V/b_V are stepped, so the inputs of every layer's values stay
    the same and the observed change is W_V's; with ``"all"`` upstream changes are included.
    Note: parametric SGD on W_V moves v_j by −η Σ_{j'} (x_j·x_{j'}) g_{j'}, a kernel-smoothed
    version of the per-vector prediction, so the cosine measures how closely the parametric
    update follows the responsibility-weighted direction.
    """
    access = model_access(model)
    if params not in ("all", "values"):
        raise InputError(f"params must be 'all' or 'values', got {params!r}")
    check_lr(lr)
    batch = access.prepare_batch(tokens, attention_mask)
    layer_list = access.norm_layers(layers)
    obj = objective or next_token_loss(batch.attention_mask)
    pnames = None if params == "all" else parameter_names(model, "values")
    # one pass at θ₀ gives the prediction (∂L/∂v) and the values before the step
    before = kept_bundles(model, batch, layer_list, objective=obj, sites=("v",))
    new, _ = stepped_copy(model, batch, lr=lr, params=pnames, objective=obj, optimizer_factory=optimizer_factory)
    after = kept_bundles(new, batch, layer_list, gradients=False, sites=("v",))
    del new
    key_valid = batch.scored  # the real (unpadded) key positions
    n_kv = access.n_kv_heads
    cos = np.zeros((len(layer_list), n_kv))
    mcos = np.zeros_like(cos)
    rel = np.zeros_like(cos)
    for i, layer in enumerate(layer_list):
        pred = -lr * before[layer].grad_values.double()  # b k kv d (autograd Σ_i α_ij u_i, group-summed)
        obs = (after[layer].acts["v"] - before[layer].acts["v"]).double()
        v0 = before[layer].acts["v"].double()
        for h in range(n_kv):
            p, o = pred[:, :, h][key_valid], obs[:, :, h][key_valid]
            cos[i, h] = float(torch.nn.functional.cosine_similarity(p.flatten(), o.flatten(), dim=0))
            ok = p.norm(dim=-1) > 1e-12 * max(float(p.norm(dim=-1).max()), 1e-300)
            mcos[i, h] = float(torch.nn.functional.cosine_similarity(p[ok], o[ok], dim=-1).mean()) if ok.any() else float("nan")
            rel[i, h] = float(o.norm() / v0[:, :, h][key_valid].norm().clamp_min(1e-300))
    return ValueUpdateAlignmentResult(layers=layer_list, cosine=cos, mean_vector_cosine=mcos, relative_change=rel, lr=lr, params=params)
