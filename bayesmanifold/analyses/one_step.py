"""One gradient step: does attention move toward the keys with positive advantage?

Paper II (arXiv 2512.22473, §3; PAPERS.md §1): gradient descent moves each score by
Δs_ij = η α_ij A_ij with the advantage A_ij = −(b_ij − b̄_i), so to first order attention grows on
keys whose values point against the error signal. :func:`one_step_check` measures it on a real
model: capture gives α and A before the step; :func:`~bayesmanifold.hooks.interventions.stepped_copy`
takes one plain gradient-descent step p ← p − lr·∂L/∂p on a copy (the user's model is untouched);
a forward-only capture of the copy gives the scores and attention after it.
"""

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ..backends import model_access
from ..backends.batch import Batch
from ..errors import ConfigError
from ..hooks.capture import capture
from ..hooks.interventions import parameter_names, stepped_copy, stepped_one_group_at_a_time
from ..hooks.objectives import Objective
from .advantage import advantage
from .headstats import entry_mask
from .stats import pearson

__all__ = ["OneStepResult", "one_step_check"]


@dataclass(frozen=True, eq=False)
class OneStepResult:
    """Did one small gradient-descent step move attention toward positive-advantage keys?

    Per head: ``adv_weighted_dalpha``, the mean over queries of Σ_j A_ij Δα_ij, the headline
    test: a step on the scores themselves (Δs = η α A) gives Σ_j A_ij Δα_ij = η Σ_j α_ij² A_ij²
    ≥ 0 to first order (because Σ_j α_ij A_ij = 0), and Σ_j A_ij Δα_ij = −Σ_j b_ij Δα_ij is the
    first-order loss decrease through this head's attention, so positive means attention moved
    toward keys whose values help; ``frac_queries_toward_positive``, the share of queries (with
    more than one key) for which it is positive; ``gain_share_positive``, the share of the
    attention mass gained (Σ max(Δα, 0)) that went to keys with A > 0 (descriptive: even the pure
    law does not make every positive key gain, since Δα_ij ∝ α_ij(α_ij A_ij − Σ_k α_ik² A_ik));
    ``net_mass_to_positive``, the mean over queries of Σ_{A>0} Δα_ij;
    ``corr_ds_alpha_adv``, the Pearson correlation over unmasked entries between the α-centred
    score change Δs_ij − Σ_j α_ij Δs_ij (what moves α to first order) and α_ij A_ij (the change a
    step on the scores themselves would make). Parameter steps move scores through W_Q and W_K
    of every layer, so the correlation is positive but below 1.

    Undefined figures are NaN, not 0: ``corr_ds_alpha_adv`` where a side is constant (the head's
    scores did not move, or it has no routing gradient: "nothing to correlate" is not
    "uncorrelated"), ``gain_share_positive`` where no attention was gained, the per-query means
    where no query has a choice of keys.
    """

    lr: float
    scope: str
    loss_before: float
    loss_after: float
    rows: list[dict[str, Any]]

    def to_dataframe(self):
        import pandas as pd

        return pd.DataFrame(self.rows)

    def to_dict(self) -> dict[str, Any]:
        """JSON form: the step, the losses around it, one object per head."""
        return {"lr": self.lr, "scope": self.scope, "loss_before": self.loss_before,
                "loss_after": self.loss_after, "heads": [dict(r) for r in self.rows]}

    def plot(self, ax=None):
        import matplotlib.pyplot as plt

        if ax is None:
            _, ax = plt.subplots(figsize=(6, 3))
        df = self.to_dataframe()
        x = np.arange(len(df))
        ax.bar(x, df["gain_share_positive"], label="share of gained mass on A>0 keys")
        ax.plot(x, df["corr_ds_alpha_adv"], "o", color="C1", label="corr(Δs centred, αA)")
        ax.axhline(0.5, color="grey", lw=0.8, ls="--")
        ax.set_xticks(x, [f"L{r.layer}H{r.head}" for r in df.itertuples()], rotation=90, fontsize=7)
        ax.set_ylim(-1, 1.05)
        ax.set_title(f"One gradient step (lr={self.lr:g})")
        ax.legend(fontsize=7)
        return ax


def _after_step(
    model: nn.Module, batch: Batch, layers: list[int], objective: Objective | None
) -> tuple[dict[int, tuple[Tensor, Tensor]], float]:
    """Scores and patterns (all heads) of ``layers`` and the objective, in one forward-only pass."""
    with capture(model, gradients=False, layers=layers, sites=("scores",), keep=True, objective=objective) as cap:
        loss = cap.run(batch)
        out = {layer: (b.acts["scores"], b.pattern) for layer, b in cap.kept.items()}
    return out, float(loss)


def one_step_check(
    model: nn.Module,
    tokens: Batch | Tensor,
    *,
    lr: float = 1e-3,
    objective: Objective | None = None,
    attention_mask: Tensor | None = None,
    layers: int | Iterable[int] | None = None,
    heads: int | Sequence[int] | Mapping[int, Sequence[int]] | None = None,
    scope: str = "all",
) -> OneStepResult:
    """Take one gradient-descent step (lr) on a copy of ``model`` and see where attention moved.

    Args:
        tokens: a :class:`~bayesmanifold.backends.batch.Batch` or token ids ``[batch, pos]``.
        scope: ``"all"`` steps every parameter (a real training step; score changes then also
            carry the indirect effect of earlier layers' updates on later layers' inputs), or
            ``"layer_qk"``, which steps only each layer's own W_Q, W_K, b_Q, b_K, one layer at a
            time (one stepped copy per layer), isolating the routing law: then Δs = η J Jᵀ(αA)
            to first order, whose inner product with αA is non-negative.

    The user's model is not modified (the steps are taken on deep copies). ``loss_after`` is the
    objective after the step (``"layer_qk"``: the mean over the per-layer copies).

    Example:
        >>> res = one_step_check(model, tokens, lr=1e-4, scope="layer_qk")  # doctest: +SKIP
        >>> (res.to_dataframe()["adv_weighted_dalpha"] > 0).all()  # doctest: +SKIP
    """
    if scope not in ("all", "layer_qk"):
        raise ConfigError(f"scope must be 'all' or 'layer_qk', got {scope!r}")
    if not (isinstance(lr, int | float) and lr > 0 and math.isfinite(lr)):
        raise ConfigError(f"lr must be a positive finite number, got {lr!r}")
    batch = model_access(model).prepare_batch(tokens, attention_mask)
    # The gradient pass gives α, ∂L/∂α (hence A) and, as an extra site, the scores before the step.
    with capture(model, keep=True, layers=layers, heads=heads, objective=objective, sites=("scores",)) as cap:
        loss_before = cap.run(batch)
        kept = cap.kept
    sel = sorted(kept)
    after: dict[int, tuple[Tensor, Tensor]] = {}
    if scope == "all":
        stepped, _ = stepped_copy(model, batch, lr=lr, params=parameter_names(model, "all"), objective=objective)
        after, loss_after = _after_step(stepped, batch, sel, objective)
        del stepped
    else:
        losses = []
        groups = {layer: parameter_names(model, "qk", layers=[layer]) for layer in sel}
        # one copy and one backward for all layers; each layer's step applied alone, then undone
        for layer, stepped in stepped_one_group_at_a_time(model, batch, lr=lr, groups=groups, objective=objective):
            out, loss = _after_step(stepped, batch, [layer], objective)
            after.update(out)
            losses.append(loss)
        loss_after = float(np.mean(losses))
    rows = []
    for layer in sel:
        b = kept[layer]
        idx = torch.tensor(b.heads, device=b.pattern.device)
        s0 = b.acts["scores"].index_select(1, idx)
        s1 = after[layer][0].index_select(1, idx)
        a0 = b.pattern
        a1 = after[layer][1].index_select(1, idx)
        mask_e = entry_mask(b)
        adv = torch.where(mask_e, advantage(a0, torch.where(mask_e, b.grad_pattern, 0)), 0)
        ds = torch.where(mask_e, s1 - s0, 0)
        ds_c = torch.where(mask_e, ds - (a0 * ds).sum(-1, keepdim=True), 0)
        da = torch.where(mask_e, a1 - a0, 0)
        pos = (adv > 0) & mask_e
        gain = da.clamp(min=0)
        qv = b.query_valid[:, None, :].to(da.dtype)
        m = mask_e[:, 0]
        qmask = b.query_valid & (m.sum(-1) > 1)  # rows with a choice to make
        nq = float(qmask.sum())
        n_entries = float(m.sum())
        for i, head in enumerate(b.heads):
            gsum = float(gain[:, i].sum())
            adv_da = (adv[:, i] * da[:, i]).sum(-1)  # Σ_j A_ij Δα_ij per query
            rows.append(
                {
                    "layer": layer,
                    "head": head,
                    "gain_share_positive": float((gain[:, i] * pos[:, i]).sum()) / gsum if gsum > 0 else float("nan"),
                    "net_mass_to_positive": float(((da[:, i] * pos[:, i]).sum(-1) * qv[:, 0]).sum() / qv.sum()),
                    "adv_weighted_dalpha": float((adv_da * qmask).sum()) / nq if nq else float("nan"),
                    "frac_queries_toward_positive": float(((adv_da > 0) & qmask).sum()) / nq if nq else float("nan"),
                    # NaN where a side is constant (see the class docstring): decided here, on purpose
                    "corr_ds_alpha_adv": pearson(ds_c[:, i][m].double(), (a0[:, i] * adv[:, i])[m].double()),
                    "mean_abs_dalpha": float(da[:, i].abs().sum() / n_entries) if n_entries else float("nan"),
                }
            )
    return OneStepResult(lr=float(lr), scope=scope, loss_before=loss_before, loss_after=loss_after, rows=rows)
