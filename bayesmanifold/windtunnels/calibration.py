"""Entropy calibration against the exact Bayesian posterior (Paper I, arXiv 2512.22471, §4).

At every scored position ``t`` of a wind tunnel the model's prediction is its softmax
*restricted to the task's answer block* (e.g. the value tokens of the bijection task). Paper I's
**entropy-calibration MAE** is

``MAE = mean_t | mean_n H_model(n, t) − mean_n H_Bayes(n, t) |``   (bits),

i.e. first average each entropy over the ``n`` sequences at position ``t``, then take the absolute
difference, then average over positions. It is reported beside the per-position
``KL(Bayes ‖ model)`` in bits (averaged over sequences), which the MAE alone can hide: a model
with the right *average* entropy but wrong posteriors has a small MAE and a large KL. The
authors' thresholds: pass < 0.01 bits, partial < 0.1.

The same KL per layer through the logit lens is :func:`bayesmanifold.analyses.logit_lens.logit_lens_kl`
(it runs the model through the engine; this module depends only on the wind tunnels).
"""

from dataclasses import dataclass

import torch
from jaxtyping import Float
from torch import Tensor, nn

from ..errors import InputError, TaskError
from .base import TaskBatch, WindTunnel, entropy_bits, make_generator

__all__ = [
    "CalibrationResult",
    "calibration_from_probs",
    "measure_calibration",
    "restricted_log_probs",
]

_LN2 = float(torch.log(torch.tensor(2.0, dtype=torch.float64)))


def restricted_log_probs(
    logits: Float[Tensor, "batch pos d_vocab"], batch: TaskBatch
) -> Float[Tensor, "batch n_sup n_answer"]:
    """Log-softmax (float64) over the answer block at the scored positions."""
    if logits.ndim != 3 or logits.shape[:2] != batch.tokens.shape:
        raise InputError(
            f"logits must be [batch, pos, d_vocab] matching tokens {tuple(batch.tokens.shape)}; "
            f"got {tuple(logits.shape)}"
        )
    if int(batch.answer_tokens.max()) >= logits.shape[-1]:
        raise TaskError(
            f"the task's answer tokens reach id {int(batch.answer_tokens.max())} but the model has "
            f"only {logits.shape[-1]} logits"
        )
    sel = logits[:, batch.positions.to(logits.device)][..., batch.answer_tokens.to(logits.device)]
    return torch.log_softmax(sel.to(torch.float64), dim=-1)


@dataclass(frozen=True, eq=False)
class CalibrationResult:
    """Entropy calibration of a model on a wind tunnel.

    Attributes:
        task: task name.
        positions: ``[n_sup]`` scored token positions.
        model_entropy_bits: ``[n_sup]`` mean model predictive entropy per position.
        bayes_entropy_bits: ``[n_sup]`` mean Bayes entropy per position.
        kl_bits: ``[n_sup]`` mean KL(Bayes ‖ model) per position.
        n_seqs: number of sequences averaged.
    """

    task: str
    positions: Tensor
    model_entropy_bits: Tensor
    bayes_entropy_bits: Tensor
    kl_bits: Tensor
    n_seqs: int

    @property
    def entropy_mae_bits(self) -> float:
        """Paper I's entropy-calibration MAE (bits)."""
        return float((self.model_entropy_bits - self.bayes_entropy_bits).abs().mean())

    @property
    def mean_kl_bits(self) -> float:
        return float(self.kl_bits.mean())

    def to_dict(self) -> dict:
        return {
            "task": self.task,
            "n_seqs": self.n_seqs,
            "entropy_mae_bits": self.entropy_mae_bits,
            "mean_kl_bits": self.mean_kl_bits,
            "positions": self.positions.tolist(),
            "model_entropy_bits": self.model_entropy_bits.tolist(),
            "bayes_entropy_bits": self.bayes_entropy_bits.tolist(),
            "kl_bits": self.kl_bits.tolist(),
        }

    def to_dataframe(self):
        """One row per scored position: t, position, model/Bayes entropy, |diff|, KL."""
        import pandas as pd

        return pd.DataFrame(
            {
                "t": range(1, len(self.positions) + 1),
                "position": self.positions.tolist(),
                "model_entropy_bits": self.model_entropy_bits.tolist(),
                "bayes_entropy_bits": self.bayes_entropy_bits.tolist(),
                "abs_error_bits": (self.model_entropy_bits - self.bayes_entropy_bits).abs().tolist(),
                "kl_bits": self.kl_bits.tolist(),
            }
        )

    def plot(self, ax=None):
        """Model vs Bayes mean entropy per scored position."""
        import matplotlib.pyplot as plt

        if ax is None:
            _, ax = plt.subplots(figsize=(5, 3.2))
        t = range(1, len(self.positions) + 1)
        ax.plot(t, self.bayes_entropy_bits.tolist(), "k--", label="Bayes")
        ax.plot(t, self.model_entropy_bits.tolist(), "o-", ms=3, label="model")
        ax.set_xlabel("scored position t")
        ax.set_ylabel("predictive entropy (bits)")
        ax.set_title(f"{self.task}: entropy MAE {self.entropy_mae_bits:.4f} bits")
        ax.legend()
        return ax


def calibration_from_probs(
    model_log_probs: Float[Tensor, "batch n_sup n_answer"],
    posterior: Float[Tensor, "batch n_sup n_answer"],
    positions: "Tensor | None" = None,
    task: str = "",
) -> CalibrationResult:
    """Calibration of given model log-probabilities against exact posteriors.

    Args:
        model_log_probs: model log-probabilities (natural log) over the answer block.
        posterior: exact posterior probabilities, same shape.
        positions: scored positions (default ``0..n_sup−1``).
        task: task name stored in the result.
    """
    if model_log_probs.shape != posterior.shape or model_log_probs.ndim != 3:
        raise InputError(
            f"model_log_probs and posterior must both be [batch, n_sup, n_answer]; got "
            f"{tuple(model_log_probs.shape)} and {tuple(posterior.shape)}"
        )
    if model_log_probs.shape[0] == 0:
        raise InputError("calibration needs at least one sequence; got an empty batch")
    lp = model_log_probs.to(torch.float64)
    post = posterior.to(torch.float64)
    h_model = entropy_bits(lp.exp())
    h_bayes = entropy_bits(post)
    log_post = torch.where(post > 0, post.clamp_min(1e-300).log(), torch.zeros_like(post))
    kl = (post * (log_post - lp)).sum(-1) / _LN2
    if positions is None:
        positions = torch.arange(lp.shape[1])
    return CalibrationResult(
        task=task,
        positions=positions.detach().cpu(),
        model_entropy_bits=h_model.mean(0).cpu(),
        bayes_entropy_bits=h_bayes.mean(0).cpu(),
        kl_bits=kl.mean(0).cpu(),
        n_seqs=int(lp.shape[0]),
    )


@torch.no_grad()
def _collect(model: nn.Module, task: WindTunnel, n_seqs: int, generator, batch_size: int,
             device: "str | torch.device", fn) -> list:
    if isinstance(n_seqs, bool) or not isinstance(n_seqs, int) or n_seqs < 1:
        raise InputError(f"n_seqs must be a positive int; got {n_seqs!r}")
    g = make_generator(generator)
    out = []
    done = 0
    while done < n_seqs:
        b = task.sample(min(batch_size, n_seqs - done), g)
        out.append(fn(b.to(device)))
        done += b.batch_size
    return out


def measure_calibration(
    model: nn.Module,
    task: WindTunnel,
    n_seqs: int = 1000,
    generator: "int | torch.Generator" = 0,
    batch_size: int = 256,
    device: "str | torch.device | None" = None,
) -> CalibrationResult:
    """Entropy-calibration MAE and per-position KL of ``model`` on fresh ``task`` sequences.

    Args:
        model: maps tokens ``[batch, pos]`` to logits ``[batch, pos, d_vocab]``.
        task: the wind tunnel.
        n_seqs: sequences to average over.
        generator: seed or ``torch.Generator`` for the evaluation sequences.
        batch_size: sequences per forward pass.
        device: where to run (default: the model's device).

    Example:
        >>> res = measure_calibration(model, BijectionTask(V=20, L=19), n_seqs=500)
        >>> res.entropy_mae_bits
    """
    if device is None:
        device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        parts = _collect(
            model, task, n_seqs, generator, batch_size, device,
            lambda b: (restricted_log_probs(model(b.tokens), b).cpu(), b.posterior.cpu(),
                       b.positions.cpu()),
        )
    finally:
        model.train(was_training)
    lp = torch.cat([p[0] for p in parts])
    post = torch.cat([p[1] for p in parts])
    return calibration_from_probs(lp, post, parts[0][2], task=task.NAME)
