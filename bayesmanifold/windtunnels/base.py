"""What every wind tunnel shares: a batch of tokens with the exact posterior predictive.

A *wind tunnel* (Paper I, arXiv 2512.22471, section 3) is a sequence task whose Bayesian
posterior predictive is known in closed form at every supervised position, while its hypothesis
space is too large to memorise. Every task in :mod:`bayesmanifold.windtunnels` samples a
:class:`TaskBatch`: the tokens, the positions at which the model's next-token prediction is
scored, the *answer block* (the vocabulary ids among which the prediction is read, e.g. the value
tokens of the bijection task), and the exact posterior over that block at each scored position.

Randomness always comes from an explicit ``torch.Generator`` (or an integer seed turned into one);
no task touches the global random state.
"""

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from jaxtyping import Float, Int
from torch import Tensor

from ..errors import TaskError

__all__ = ["TaskBatch", "WindTunnel", "make_generator", "entropy_bits"]


def make_generator(seed_or_generator: "int | torch.Generator | None") -> torch.Generator:
    """Return a CPU ``torch.Generator``: the one given, or a fresh one seeded with ``seed``."""
    if isinstance(seed_or_generator, torch.Generator):
        return seed_or_generator
    if seed_or_generator is None:
        raise TaskError("a seed (int) or a torch.Generator is required; got None")
    if isinstance(seed_or_generator, bool) or not isinstance(seed_or_generator, int):
        raise TaskError(
            f"seed must be an int or a torch.Generator; got {type(seed_or_generator).__name__}"
        )
    g = torch.Generator()
    g.manual_seed(int(seed_or_generator))
    return g


def entropy_bits(p: Float[Tensor, "... n"]) -> Float[Tensor, "..."]:
    """Shannon entropy in bits of probability vectors along the last axis (0·log 0 = 0)."""
    p = p.to(torch.float64) if p.dtype != torch.float64 else p
    logp = torch.where(p > 0, p.clamp_min(1e-300).log2(), torch.zeros_like(p))
    return -(p * logp).sum(-1)


@dataclass(frozen=True, eq=False)
class TaskBatch:
    """A batch of wind-tunnel sequences with exact posteriors.

    Attributes:
        tokens: ``[batch, pos]`` token ids.
        positions: ``[n_sup]`` positions (same for every sequence) whose next-token prediction
            is scored.
        answer_tokens: ``[n_answer]`` vocabulary ids of the answer block; the model's
            prediction at a scored position is its softmax restricted to these ids, in this order.
        posterior: ``[batch, n_sup, n_answer]`` exact posterior predictive (float64) over the
            answer block at each scored position.
        targets: ``[batch, n_sup]`` index into the answer block of the realised answer (the
            hard next-token target; for HMM filtering the true hidden state).
    """

    tokens: Int[Tensor, "batch pos"]
    positions: Int[Tensor, " n_sup"]
    answer_tokens: Int[Tensor, " n_answer"]
    posterior: Float[Tensor, "batch n_sup n_answer"]
    targets: Int[Tensor, "batch n_sup"]

    @property
    def batch_size(self) -> int:
        return int(self.tokens.shape[0])

    def bayes_entropy_bits(self) -> Float[Tensor, "batch n_sup"]:
        """Entropy (bits) of the exact posterior at each scored position."""
        return entropy_bits(self.posterior)

    def to(self, device: "str | torch.device") -> "TaskBatch":
        return TaskBatch(
            tokens=self.tokens.to(device),
            positions=self.positions.to(device),
            answer_tokens=self.answer_tokens.to(device),
            posterior=self.posterior.to(device),
            targets=self.targets.to(device),
        )


class WindTunnel:
    """Base class of the tasks. Subclasses are frozen, validated dataclasses.

    Subclasses define ``NAME``, the properties ``d_vocab``, ``seq_len`` and ``answer_tokens``,
    and ``sample(batch_size, generator)``.
    """

    NAME: ClassVar[str] = ""
    #: the training loss the paper uses for this task: "hard" (next-token cross-entropy against
    #: the realised answer) or "soft" (cross-entropy against the exact posterior).
    DEFAULT_LOSS: ClassVar[str] = "hard"

    @property
    def d_vocab(self) -> int:  # pragma: no cover - abstract
        raise NotImplementedError

    @property
    def seq_len(self) -> int:  # pragma: no cover - abstract
        raise NotImplementedError

    @property
    def answer_tokens(self) -> Int[Tensor, " n_answer"]:  # pragma: no cover - abstract
        raise NotImplementedError

    def sample(
        self, batch_size: int, generator: "int | torch.Generator"
    ) -> TaskBatch:  # pragma: no cover - abstract
        raise NotImplementedError

    def to_dict(self) -> dict[str, Any]:
        from dataclasses import asdict

        return {"task": self.NAME, **asdict(self)}  # type: ignore[call-overload]

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "WindTunnel":
        """Inverse of :meth:`to_dict` (the ``"task"`` key names the class and is dropped)."""
        return cls(**{k: v for k, v in d.items() if k != "task"})

    @staticmethod
    def _check_batch_size(batch_size: Any) -> int:
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise TaskError(f"batch_size must be a positive int; got {batch_size!r}")
        return batch_size


def _check_int(name: str, value: Any, lo: int, hi: "int | None" = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TaskError(f"{name} must be an int; got {type(value).__name__} {value!r}")
    if value < lo or (hi is not None and value > hi):
        rng = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
        raise TaskError(f"{name} must be {rng}; got {value}")
