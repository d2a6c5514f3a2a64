"""The positive-feedback probe: value step → advantage → attention (Paper II, PAPERS.md §2).

After a value step Δv_j = −η Σ_{i'} α_{i'j} u_{i'} the compatibilities change by
Δb_ij = u_i·Δv_j = −η Σ_{i'} α_{i'j}(u_i·u_{i'}), so where the queries using j have aligned error
signals the advantage of j rises and a following routing step moves their attention towards j
("coupled specialization"). :func:`positive_feedback_probe` measures, after a value-only step on a
copy, the correlation between the observed Δb_ij and that prediction, and whether a subsequent
routing step moves attention towards the keys whose advantage rose.
"""

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from jaxtyping import Int
from torch import Tensor

from ..backends import ModelLike, model_access
from ..hooks import next_token_loss
from ..hooks.interventions import parameter_names, stepped_copy
from .stats import pearson
from .value_updates import check_lr, kept_bundles

__all__ = ["PositiveFeedbackResult", "positive_feedback_probe"]


@dataclass(frozen=True, eq=False)
class PositiveFeedbackResult:
    """Positive-feedback probe per layer and query head.

    Attributes:
        db_corr: [layers, heads] Pearson r between observed Δb_ij (value step) and the prediction
            −η Σ_{i'} α_{i'j}(u_i·u_{i'}), over valid (query, key) entries (NaN when undefined).
        feedback_corr: [layers, heads] Pearson r between the advantage change ΔA_ij caused by the
            value step and the extra attention change Δα_ij it causes in the following routing
            step (routing step after the value step minus routing step without it).
        sign_agreement: [layers, heads] |ΔA|-weighted fraction of entries where sign(extra Δα)
            = sign(ΔA) (0.5 = chance).
    """

    layers: list[int]
    db_corr: np.ndarray
    feedback_corr: np.ndarray
    sign_agreement: np.ndarray
    lr: float

    def to_dataframe(self):
        """Tidy: one row per (layer, head)."""
        import pandas as pd

        return pd.DataFrame(
            [
                {
                    "layer": layer,
                    "head": h,
                    "db_corr": float(self.db_corr[i, h]),
                    "feedback_corr": float(self.feedback_corr[i, h]),
                    "sign_agreement": float(self.sign_agreement[i, h]),
                }
                for i, layer in enumerate(self.layers)
                for h in range(self.db_corr.shape[1])
            ]
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe: every field as plain lists (NaN stays a float)."""
        return {
            "layers": [int(x) for x in self.layers],
            "db_corr": np.asarray(self.db_corr, dtype=float).tolist(),
            "feedback_corr": np.asarray(self.feedback_corr, dtype=float).tolist(),
            "sign_agreement": np.asarray(self.sign_agreement, dtype=float).tolist(),
            "lr": float(self.lr),
        }

    def plot(self, ax=None):
        """Both correlations per (layer, head) as bars."""
        import matplotlib.pyplot as plt

        if ax is None:
            _, ax = plt.subplots(figsize=(5, 3.5))
        x = np.arange(self.db_corr.size)
        ax.bar(x - 0.2, self.db_corr.ravel(), width=0.4, label="corr(Δb obs, pred)")
        ax.bar(x + 0.2, self.feedback_corr.ravel(), width=0.4, label="corr(ΔA, extra Δα)")
        ax.set_xlabel("layer × head")
        ax.set_ylabel("Pearson r")
        ax.set_title("positive feedback: value step → advantage → attention", fontsize=9)
        ax.legend(fontsize=8)
        return ax


def positive_feedback_probe(
    model: ModelLike,
    tokens: Int[Tensor, "batch pos"],
    *,
    lr: float = 1e-2,
    routing_lr: float | None = None,
    objective: Callable[[Tensor, Tensor], Tensor] | None = None,
    attention_mask: Tensor | None = None,
    layers: Iterable[int] | int | None = None,
) -> PositiveFeedbackResult:
    """Probe the value → advantage → attention feedback loop of Paper II (PAPERS.md §2).

    1. Capture α, u, v, b at θ₀. 2. Take a value-only SGD step (W_V, b_V of every layer) on a
    copy → θ₁; capture b again: observed Δb vs predicted −η Σ_{i'} α_{i'j}(u_i·u_{i'}).
    3. Take a routing step (W_Q, W_K, b_Q, b_K; ``routing_lr``, default ``lr``) from θ₁ and from θ₀;
    the difference of their attention changes is the attention change caused by the value step,
    compared with the advantage change ΔA_ij = −(Δb_ij − Δb̄_i).
    """
    access = model_access(model)
    check_lr(lr)
    rlr = lr if routing_lr is None else routing_lr
    check_lr(rlr, "routing_lr")
    batch = access.prepare_batch(tokens, attention_mask)
    layer_list = access.norm_layers(layers)
    obj = objective or next_token_loss(batch.attention_mask)
    values, qk = parameter_names(model, "values"), parameter_names(model, "qk")
    k0 = kept_bundles(model, batch, layer_list, objective=obj)
    m1, _ = stepped_copy(model, batch, lr=lr, params=values, objective=obj)
    k1 = kept_bundles(m1, batch, layer_list, objective=obj)
    r0, _ = stepped_copy(model, batch, lr=rlr, params=qk, objective=obj)
    a0r = kept_bundles(r0, batch, layer_list, gradients=False)
    del r0
    r1, _ = stepped_copy(m1, batch, lr=rlr, params=qk, objective=obj)
    a1r = kept_bundles(r1, batch, layer_list, gradients=False)
    del r1, m1
    H = access.n_heads
    dbc = np.full((len(layer_list), H), np.nan)
    fbc = np.full_like(dbc, np.nan)
    sgn = np.full_like(dbc, np.nan)
    for i, layer in enumerate(layer_list):
        b0, b1 = k0[layer], k1[layer]
        valid = b0.valid  # b q k: causal and key padding
        alpha = b0.pattern.double()  # b h q k
        u = b0.grad_z.double()  # b q h d
        g = torch.einsum("bhqk,bqhd->bkhd", alpha, u)  # Σ_i α_ij u_i per query head
        pred = -lr * torch.einsum("bqhd,bkhd->bhqk", u, g)
        db = b1.grad_pattern.double() - b0.grad_pattern.double()
        bbar0 = (alpha * b0.grad_pattern.double() * valid[:, None]).sum(-1, keepdim=True)
        alpha1 = b1.pattern.double()
        bbar1 = (alpha1 * b1.grad_pattern.double() * valid[:, None]).sum(-1, keepdim=True)
        dA = -((b1.grad_pattern.double() - bbar1) - (b0.grad_pattern.double() - bbar0))
        # the attention change the value step causes in the following routing step
        extra = (a1r[layer].pattern.double() - alpha1) - (a0r[layer].pattern.double() - alpha)
        v = valid & b0.query_valid[:, :, None]
        multi = v & (valid.sum(-1, keepdim=True) >= 2)  # only entries with a choice: ≥ 2 valid keys
        for j in range(len(b0.heads)):
            dbc[i, b0.heads[j]] = pearson(db[:, j][v], pred[:, j][v])
            x, y = dA[:, j][multi], extra[:, j][multi]
            fbc[i, b0.heads[j]] = pearson(x, y)
            w = x.abs()
            agree = (torch.sign(x) == torch.sign(y)).double()
            sgn[i, b0.heads[j]] = float((w * agree).sum() / w.sum()) if w.sum() > 0 else float("nan")
    return PositiveFeedbackResult(layers=layer_list, db_corr=dbc, feedback_corr=fbc, sign_agreement=sgn, lr=lr)
