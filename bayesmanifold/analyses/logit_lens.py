"""The logit lens against the exact posterior: KL(Bayes ‖ lens of layer l) in bits (Paper I, §4).

Each layer's residual stream, captured forward-only by the engine, goes through the final norm
and the unembedding (the logit lens), restricted to the task's answer block as calibration is
(:mod:`bayesmanifold.windtunnels.calibration`), and is compared with the exact posterior.
"""

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..backends import model_access
from ..errors import InputError, ModelError
from ..hooks.capture import capture
from ..windtunnels.base import TaskBatch, WindTunnel
from ..windtunnels.calibration import _collect, calibration_from_probs, restricted_log_probs

__all__ = ["LogitLensResult", "logit_lens_kl"]


@dataclass(frozen=True, eq=False)
class LogitLensResult:
    """KL(Bayes ‖ logit lens of layer l) in bits, averaged over sequences and positions.

    Attributes:
        task: task name.
        layers: labels, ``"embed"`` then ``"0"``..``"L−1"`` (residual stream after each block).
        kl_bits: ``[n_layers + 1]`` mean KL per layer.
        kl_bits_per_position: ``[n_layers + 1, n_sup]``.
        n_seqs: number of sequences averaged.
    """

    task: str
    layers: tuple
    kl_bits: Tensor
    kl_bits_per_position: Tensor
    n_seqs: int

    def to_dataframe(self):
        """One row per (layer, scored position)."""
        import pandas as pd

        rows = []
        for i, name in enumerate(self.layers):
            for t, v in enumerate(self.kl_bits_per_position[i].tolist()):
                rows.append({"layer": name, "t": t + 1, "kl_bits": v})
        return pd.DataFrame(rows)

    def plot(self, ax=None):
        """Mean KL per layer."""
        import matplotlib.pyplot as plt

        if ax is None:
            _, ax = plt.subplots(figsize=(5, 3.2))
        ax.plot(range(len(self.layers)), self.kl_bits.tolist(), "o-")
        ax.set_xticks(range(len(self.layers)), list(self.layers))
        ax.set_xlabel("residual stream after layer")
        ax.set_ylabel("KL(Bayes ‖ logit lens) (bits)")
        ax.set_yscale("log")
        ax.set_title(f"{self.task}: logit lens")
        return ax


class _ResidualLens:
    """Forward-only accumulator: the residual stream entering block 0 and leaving every block."""

    needs_gradients = False
    sites = ("resid_pre", "resid_post")

    def __init__(self) -> None:
        self.resid: dict = {}

    def update(self, bundle) -> None:
        if bundle.layer == 0:
            self.resid["embed"] = bundle.acts["resid_pre"]
        self.resid[bundle.layer] = bundle.acts["resid_post"]

    def merge(self, other: "_ResidualLens") -> "_ResidualLens":
        self.resid.update(other.resid)
        return self

    def finalize(self) -> dict:
        out, self.resid = self.resid, {}
        return out


def logit_lens_kl(
    model: nn.Module,
    task: WindTunnel,
    n_seqs: int = 256,
    generator: "int | torch.Generator" = 0,
    batch_size: int = 256,
) -> LogitLensResult:
    """Per-layer logit-lens KL(Bayes ‖ model) in bits for a TransformerLens model.

    Each residual stream (entering block 0, then leaving every block) goes through the model's
    final norm and unembedding; the result is scored like the model's own logits.

    Raises:
        InputError: ``model`` is not a TransformerLens model (the lens reads its residual stream).
    """
    try:
        access = model_access(model)
    except ModelError as exc:
        raise InputError(f"logit_lens_kl needs a TransformerLens model: {exc}") from None
    device = access.device
    n_layers = access.n_layers
    keys = ["embed", *range(n_layers)]
    lens = _ResidualLens()

    def per_batch(b: TaskBatch):
        with capture(model, accumulators=[lens], gradients=False) as cap:
            cap.run(b.tokens)
        resid = lens.finalize()
        kls = []
        for k in keys:
            logits = access.unembed(access.final_norm(resid[k]))
            lp = restricted_log_probs(logits, b)
            res = calibration_from_probs(lp.cpu(), b.posterior.cpu())
            kls.append(res.kl_bits * b.batch_size)
        return torch.stack(kls), b.batch_size

    was_training = model.training
    model.eval()
    try:
        parts = _collect(model, task, n_seqs, generator, batch_size, device, per_batch)
    finally:
        model.train(was_training)
    total = sum(p[1] for p in parts)
    per_pos = sum(p[0] for p in parts) / total
    return LogitLensResult(
        task=task.NAME,
        layers=("embed",) + tuple(str(i) for i in range(n_layers)),
        kl_bits=per_pos.mean(-1),
        kl_bits_per_position=per_pos,
        n_seqs=int(total),
    )
