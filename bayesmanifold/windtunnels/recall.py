"""Associative recall: the retrieval wind tunnel of Paper I's later versions (arXiv 2512.22471).

A sequence stores ``N`` key–value pairs, then ``F`` filler tokens, then ``Q`` queries:

``k_1 v_1 … k_N v_N  f … f  [QUERY] q_1 a_1 [QUERY] q_2 a_2 …``

Keys are tokens ``0..n_keys−1``, values ``n_keys..n_keys+n_values−1``, fillers the next
``n_filler`` ids and ``[QUERY]`` the last id. Pair keys are drawn from ``n_keys`` keys (without
replacement when ``distinct_keys``, otherwise with replacement, so a key may be stored with several
values); values are drawn uniformly with replacement. Each query picks one stored pair uniformly
and shows its key ``q``; the answer ``a`` is that pair's value.

Exact posterior predictive of ``a`` at the query key: the fraction of stored pairs with key ``q``
whose value is ``v`` — a delta when the key is stored once, uniform over the stored candidates
(counted with multiplicity) when it is ambiguous. Earlier queries' answers carry no extra
information because every query draws its pair independently.
"""

from dataclasses import dataclass

import torch
from jaxtyping import Int
from torch import Tensor

from ..errors import TaskError
from .base import TaskBatch, WindTunnel, _check_int, make_generator

__all__ = ["RecallTask"]


@dataclass(frozen=True, kw_only=True)
class RecallTask(WindTunnel):
    """Associative recall with ``N`` stored pairs, ``F`` fillers and ``Q`` queries.

    Args:
        N: stored pairs per sequence.
        n_keys: size of the key vocabulary.
        n_values: size of the value vocabulary.
        F: filler tokens between the pairs and the queries.
        Q: queries per sequence.
        n_filler: number of distinct filler tokens.
        distinct_keys: draw the N keys without replacement (every query is then a delta).

    Example:
        >>> task = RecallTask(N=8, n_keys=16, n_values=16, F=4, Q=4)
        >>> b = task.sample(2, generator=0)
        >>> b.tokens.shape, b.posterior.shape
        (torch.Size([2, 32]), torch.Size([2, 4, 16]))
    """

    NAME = "recall"
    DEFAULT_LOSS = "hard"

    N: int = 8
    n_keys: int = 16
    n_values: int = 16
    F: int = 4
    Q: int = 4
    n_filler: int = 4
    distinct_keys: bool = False

    def __post_init__(self) -> None:
        _check_int("N (pairs)", self.N, 1)
        _check_int("n_keys", self.n_keys, 1)
        _check_int("n_values", self.n_values, 2)
        _check_int("F (filler length)", self.F, 0)
        _check_int("Q (queries)", self.Q, 1)
        _check_int("n_filler", self.n_filler, 1)
        if not isinstance(self.distinct_keys, bool):
            raise TaskError(f"distinct_keys must be a bool; got {self.distinct_keys!r}")
        if self.distinct_keys and self.N > self.n_keys:
            raise TaskError(
                f"N={self.N} distinct keys cannot be drawn from n_keys={self.n_keys}; "
                "use N <= n_keys or distinct_keys=False"
            )

    @property
    def query_token(self) -> int:
        return self.n_keys + self.n_values + self.n_filler

    @property
    def d_vocab(self) -> int:
        return self.query_token + 1

    @property
    def seq_len(self) -> int:
        return 2 * self.N + self.F + 3 * self.Q

    @property
    def answer_tokens(self) -> Int[Tensor, " n_answer"]:
        return torch.arange(self.n_keys, self.n_keys + self.n_values)

    @property
    def positions(self) -> Int[Tensor, " n_sup"]:
        return 2 * self.N + self.F + 1 + 3 * torch.arange(self.Q)

    def sample(self, batch_size: int, generator: "int | torch.Generator") -> TaskBatch:
        """Sample ``batch_size`` sequences with their exact posteriors.

        Args:
            batch_size: number of sequences (>= 1).
            generator: a ``torch.Generator`` (advanced in place) or an int seed.
        """
        B = self._check_batch_size(batch_size)
        g = make_generator(generator)
        N, Q = self.N, self.Q
        if self.distinct_keys:
            keys = torch.rand(B, self.n_keys, generator=g).argsort(-1)[:, :N]
        else:
            keys = torch.randint(0, self.n_keys, (B, N), generator=g)
        vals = torch.randint(0, self.n_values, (B, N), generator=g)
        fill = torch.randint(0, self.n_filler, (B, self.F), generator=g)
        pick = torch.randint(0, N, (B, Q), generator=g)
        qk = keys.gather(1, pick)
        qv = vals.gather(1, pick)

        pairs = torch.stack([keys, vals + self.n_keys], -1).reshape(B, 2 * N)
        queries = torch.stack(
            [torch.full_like(qk, self.query_token), qk, qv + self.n_keys], -1
        ).reshape(B, 3 * Q)
        fill_tok = fill + self.n_keys + self.n_values
        tokens = torch.cat([pairs, fill_tok, queries], dim=1)

        match = (keys[:, None, :] == qk[:, :, None]).to(torch.float64)  # [B, Q, N]
        onehot = torch.nn.functional.one_hot(vals, self.n_values).to(torch.float64)  # [B, N, V]
        counts = match @ onehot  # [B, Q, V]
        post = counts / counts.sum(-1, keepdim=True)
        return TaskBatch(
            tokens=tokens,
            positions=self.positions,
            answer_tokens=self.answer_tokens,
            posterior=post,
            targets=qv,
        )
