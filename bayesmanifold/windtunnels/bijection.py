"""Bijection elimination: the first wind tunnel of Paper I (arXiv 2512.22471, section 3.1).

Each sequence draws a fresh random bijection π on {0..V−1} and shows ``L`` pairs
``k_1 π(k_1) k_2 π(k_2) … k_L π(k_L)``; keys are tokens ``0..V−1`` and values ``V..2V−1``
(vocabulary ``2V``), as in the authors' code. The model is scored at every key position on its
prediction of the value that follows.

Exact posterior predictive of π(k_t) given the prefix:

* keys drawn *without* replacement: uniform over the ``V − t + 1`` values not yet revealed, so the
  Bayes entropy is ``H_t = log2(V − t + 1)`` bits (4.32 → 1 bit for V = 20, L = 19);
* keys drawn *with* replacement: a key already seen has a known value (a delta, H = 0); a new key
  is uniform over the values not yet assigned to distinct seen keys (the "sawtooth" curve).
"""

from dataclasses import dataclass

import torch
from jaxtyping import Int
from torch import Tensor

from ..errors import TaskError
from .base import TaskBatch, WindTunnel, _check_int, make_generator

__all__ = ["BijectionTask"]


@dataclass(frozen=True, kw_only=True)
class BijectionTask(WindTunnel):
    """Bijection elimination with ``V`` keys/values and ``L`` shown pairs.

    Args:
        V: size of the key set and of the value set (vocabulary ``2V``).
        L: number of (key, value) pairs per sequence; at most ``V`` without replacement.
        replacement: draw keys with replacement (repeated keys have a known value).

    Example:
        >>> task = BijectionTask(V=20, L=19)
        >>> batch = task.sample(8, generator=0)
        >>> batch.tokens.shape, batch.posterior.shape
        (torch.Size([8, 38]), torch.Size([8, 19, 20]))
    """

    NAME = "bijection"
    DEFAULT_LOSS = "hard"

    V: int = 20
    L: int = 19
    replacement: bool = False

    def __post_init__(self) -> None:
        _check_int("V", self.V, 2, 10_000)
        _check_int("L", self.L, 1)
        if not isinstance(self.replacement, bool):
            raise TaskError(f"replacement must be a bool; got {self.replacement!r}")
        if not self.replacement and self.L > self.V:
            raise TaskError(
                f"L={self.L} pairs cannot be drawn without replacement from V={self.V} keys; "
                "use L <= V or replacement=True"
            )

    @property
    def d_vocab(self) -> int:
        return 2 * self.V

    @property
    def seq_len(self) -> int:
        return 2 * self.L

    @property
    def answer_tokens(self) -> Int[Tensor, " n_answer"]:
        return torch.arange(self.V, 2 * self.V)

    @property
    def positions(self) -> Int[Tensor, " n_sup"]:
        return torch.arange(0, 2 * self.L, 2)

    def bayes_entropy_curve(self) -> Tensor:
        """Closed-form Bayes entropy (bits) per pair without replacement: log2(V − t + 1)."""
        if self.replacement:
            raise TaskError("the closed-form curve exists only without replacement; "
                            "use sample(...).bayes_entropy_bits() with replacement")
        t = torch.arange(1, self.L + 1, dtype=torch.float64)
        return torch.log2(self.V - t + 1)

    def sample(self, batch_size: int, generator: "int | torch.Generator") -> TaskBatch:
        """Sample ``batch_size`` sequences with their exact posteriors.

        Args:
            batch_size: number of sequences (>= 1).
            generator: a ``torch.Generator`` (advanced in place) or an int seed.
        """
        B = self._check_batch_size(batch_size)
        g = make_generator(generator)
        V, L = self.V, self.L
        perm = torch.rand(B, V, generator=g).argsort(dim=-1)  # π: key -> value index
        if self.replacement:
            keys = torch.randint(0, V, (B, L), generator=g)
        else:
            keys = torch.rand(B, V, generator=g).argsort(dim=-1)[:, :L]
        vals = perm.gather(1, keys)  # [B, L]
        tokens = torch.empty(B, 2 * L, dtype=torch.long)
        tokens[:, 0::2] = keys
        tokens[:, 1::2] = vals + V

        # revealed[b, t, v]: value v was revealed strictly before pair t
        onehot = torch.nn.functional.one_hot(vals, V).to(torch.int64)
        before = onehot.cumsum(dim=1) - onehot
        revealed = before > 0
        # key seen before pair t (only possible with replacement)
        same = keys[:, :, None] == keys[:, None, :]  # [B, t, s]
        earlier = torch.ones(L, L, dtype=torch.bool).tril(-1)  # s < t
        seen = (same & earlier).any(dim=-1)  # [B, L]

        free = (~revealed).to(torch.float64)
        post = free / free.sum(-1, keepdim=True)
        delta = torch.nn.functional.one_hot(vals, V).to(torch.float64)
        post = torch.where(seen[..., None], delta, post)
        return TaskBatch(
            tokens=tokens,
            positions=self.positions,
            answer_tokens=self.answer_tokens,
            posterior=post,
            targets=vals,
        )
