"""HMM filtering: the second wind tunnel of Paper I (arXiv 2512.22471, section 3.2).

Each sequence draws a fresh hidden Markov model with ``S`` states and ``O`` symbols: every row of
the transition matrix T and of the emission matrix E is Dirichlet(1), floored at 0.05,
renormalised and discretised to the 0.01 grid (each entry a multiple of 0.01, at least 0.05, each
row summing to exactly 1.00); the initial law is uniform. The model reads the parameters, then
``K`` observations:

``[TRANS] T00 … T(S-1)(S-1) [EMIT] E00 … E(S-1)(O-1) [SEP] [OBS] o_1 [OBS] o_2 … [OBS] o_K``

Tokens (vocabulary ``100 + max(S, O)``; 105 for S = O = 5 as in the paper):

* ``0..95``: probability tokens for 0.05, 0.06, …, 1.00 (token ``i`` is ``(i + 5) / 100``);
* ``96`` [TRANS], ``97`` [EMIT], ``98`` [SEP], ``99`` [OBS];
* ``100..100+O−1``: observation symbols.

Scored positions are the symbol positions ``o_t``; the target there is the filtering posterior
``p(s_t | o_1..o_t)`` computed by a log-space forward algorithm. **State readout:** the paper's
code uses a dedicated output head; here the model's logits at the tokens ``100..100+S−1`` are
read as the S states (state ``i`` ↔ token ``100 + i``), so any next-token model of the right
vocabulary fits the task unchanged. The paper's loss is cross-entropy against this soft posterior
(``DEFAULT_LOSS = "soft"``).
"""

from dataclasses import dataclass

import torch
from jaxtyping import Float, Int
from torch import Tensor

from ..errors import TaskError
from .base import TaskBatch, WindTunnel, _check_int, make_generator

__all__ = ["HMMTask", "discretise_rows", "forward_filter", "tokenise_hmm",
           "N_PROB_TOKENS", "TRANS", "EMIT", "SEP", "OBS", "SYMBOL0"]

N_PROB_TOKENS = 96  # 0.05 .. 1.00 in steps of 0.01
TRANS, EMIT, SEP, OBS = 96, 97, 98, 99
SYMBOL0 = 100
_FLOOR = 5  # hundredths


def discretise_rows(p: Float[Tensor, "... n"]) -> Int[Tensor, "... n"]:
    """Round probability rows to integer hundredths, each >= 5 and summing to exactly 100.

    Floors each entry at 0.05, renormalises, then apportions by largest remainder; if the floor
    pushed a row above 100, the surplus is taken from the largest entries (which stay >= 5).
    """
    n = p.shape[-1]
    if n * _FLOOR > 100:
        raise TaskError(f"rows of {n} entries cannot all be >= 0.05; use at most 20 states/symbols")
    p = p.to(torch.float64).clamp_min(_FLOOR / 100)
    p = p / p.sum(-1, keepdim=True)
    x = (p * 100).reshape(-1, n)
    base = x.floor().clamp_min(_FLOOR)
    rem = x - x.floor()
    short = (100 - base.sum(-1)).to(torch.long)  # [rows]
    # largest remainder: the `short` entries with the largest remainders get +1
    order = rem.argsort(dim=-1, descending=True, stable=True)
    rank = order.argsort(dim=-1, stable=True)
    base = base + (rank < short.clamp_min(0)[:, None]).to(base.dtype)
    # floors raised the sum above 100: take 1 from the largest entry, repeatedly
    rows = torch.arange(base.shape[0])
    while bool((short < 0).any()):
        neg = short < 0
        j = base.argmax(dim=-1)
        base[rows[neg], j[neg]] -= 1
        short = short + neg.to(torch.long)
    return base.reshape(p.shape).to(torch.long)


def forward_filter(
    T: Float[Tensor, "batch S S"],
    E: Float[Tensor, "batch S O"],
    obs: Int[Tensor, "batch K"],
    init: "Float[Tensor, 'batch S'] | None" = None,
) -> Float[Tensor, "batch K S"]:
    """Filtering posteriors ``p(s_t | o_1..o_t)`` by the forward algorithm in log space (float64)."""
    T = T.to(torch.float64)
    E = E.to(torch.float64)
    B, S, _ = T.shape
    logT, logE = T.log(), E.log()
    if init is None:
        init = torch.full((B, S), 1.0 / S, dtype=torch.float64)
    log_alpha = init.log() + logE.gather(2, obs[:, None, :1].expand(B, S, 1)).squeeze(-1)
    out = []
    log_alpha = log_alpha - log_alpha.logsumexp(-1, keepdim=True)
    out.append(log_alpha)
    for t in range(1, obs.shape[1]):
        pred = (log_alpha[:, :, None] + logT).logsumexp(dim=1)  # [B, S]
        emit = logE.gather(2, obs[:, None, t : t + 1].expand(B, S, 1)).squeeze(-1)
        log_alpha = pred + emit
        log_alpha = log_alpha - log_alpha.logsumexp(-1, keepdim=True)
        out.append(log_alpha)
    return torch.stack(out, dim=1).exp()


def tokenise_hmm(
    T100: Int[Tensor, "batch S S"], E100: Int[Tensor, "batch S O"], obs: Int[Tensor, "batch K"]
) -> Int[Tensor, "batch pos"]:
    """Token sequences ``[TRANS] T.. [EMIT] E.. [SEP] [OBS] o_1 …`` from integer hundredths."""
    B, S, O = E100.shape  # noqa: E741
    K = obs.shape[1]
    col = lambda v: torch.full((B, 1), v, dtype=torch.long)  # noqa: E731
    obs_part = torch.stack([torch.full_like(obs, OBS), obs + SYMBOL0], dim=-1).reshape(B, 2 * K)
    return torch.cat(
        [col(TRANS), T100.reshape(B, S * S) - _FLOOR, col(EMIT), E100.reshape(B, S * O) - _FLOOR,
         col(SEP), obs_part],
        dim=1,
    )


@dataclass(frozen=True, kw_only=True)
class HMMTask(WindTunnel):
    """HMM filtering with ``S`` states, ``O`` symbols and ``K`` observations.

    Args:
        S: number of hidden states (2..20).
        O: number of observation symbols (2..20).
        K: number of observations per sequence.

    Example:
        >>> task = HMMTask(S=5, O=5, K=20)
        >>> b = task.sample(4, generator=0)
        >>> b.tokens.shape, b.posterior.shape, task.d_vocab
        (torch.Size([4, 93]), torch.Size([4, 20, 5]), 105)
    """

    NAME = "hmm"
    DEFAULT_LOSS = "soft"

    S: int = 5
    O: int = 5  # noqa: E741
    K: int = 20

    def __post_init__(self) -> None:
        _check_int("S (states)", self.S, 2, 20)
        _check_int("O (symbols)", self.O, 2, 20)
        _check_int("K (observations)", self.K, 1)

    @property
    def d_vocab(self) -> int:
        return SYMBOL0 + max(self.S, self.O)

    @property
    def header_len(self) -> int:
        return 3 + self.S * self.S + self.S * self.O

    @property
    def seq_len(self) -> int:
        return self.header_len + 2 * self.K

    @property
    def answer_tokens(self) -> Int[Tensor, " n_answer"]:
        return torch.arange(SYMBOL0, SYMBOL0 + self.S)

    @property
    def positions(self) -> Int[Tensor, " n_sup"]:
        return self.header_len + 1 + 2 * torch.arange(self.K)

    def with_K(self, K: int) -> "HMMTask":
        """The same task at another number of observations (length generalisation)."""
        return HMMTask(S=self.S, O=self.O, K=K)

    def sample_params(
        self, batch_size: int, generator: "int | torch.Generator"
    ) -> tuple[Int[Tensor, "batch S S"], Int[Tensor, "batch S O"]]:
        """Sample discretised T and E as integer hundredths."""
        B = self._check_batch_size(batch_size)
        g = make_generator(generator)
        t = -torch.rand(B, self.S, self.S, generator=g, dtype=torch.float64).clamp_min(1e-300).log()
        e = -torch.rand(B, self.S, self.O, generator=g, dtype=torch.float64).clamp_min(1e-300).log()
        T = t / t.sum(-1, keepdim=True)
        E = e / e.sum(-1, keepdim=True)
        return discretise_rows(T), discretise_rows(E)

    def decode(self, tokens: Int[Tensor, "batch pos"]) -> tuple[Tensor, Tensor, Tensor]:
        """``(T, E, obs)`` read back from this task's token sequences (T, E as float64 rows)."""
        S, O = self.S, self.O  # noqa: E741
        if tokens.ndim != 2 or tokens.shape[1] < self.seq_len:
            raise TaskError(f"tokens must be [batch, >= {self.seq_len}] sequences of this task; got {tuple(tokens.shape)}")
        T = (tokens[:, 1 : 1 + S * S].to(torch.float64) + _FLOOR).view(-1, S, S) / 100
        start = 2 + S * S
        E = (tokens[:, start : start + S * O].to(torch.float64) + _FLOOR).view(-1, S, O) / 100
        obs = tokens[:, self.positions] - SYMBOL0
        if (obs < 0).any() or (obs >= O).any() or (T <= 0).any() or (E <= 0).any():
            raise TaskError("tokens do not hold this task's parameters and observations; not its sequences")
        return T, E, obs

    def window_posterior(self, tokens: Int[Tensor, "batch pos"], window: int = 1) -> Float[Tensor, "batch K S"]:
        """A finite-memory baseline: the exact filter on only the last ``window`` observations.

        At each observation t the forward algorithm restarts from the uniform law at
        t − window + 1. ``window=1`` ignores T (p(s_t | o_t) ∝ E[s_t, o_t]); the gap between the
        windows' KL to the exact posterior and a model's says how much history the model uses.
        """
        _check_int("window", window, 1)
        T, E, obs = self.decode(tokens)
        out = torch.empty(obs.shape[0], self.K, self.S, dtype=torch.float64)
        for t in range(self.K):
            out[:, t] = forward_filter(T, E, obs[:, max(0, t - window + 1) : t + 1])[:, -1]
        return out

    def sample(self, batch_size: int, generator: "int | torch.Generator") -> TaskBatch:
        """Sample ``batch_size`` HMMs and observation sequences with filtering posteriors.

        Args:
            batch_size: number of sequences (>= 1).
            generator: a ``torch.Generator`` (advanced in place) or an int seed.
        """
        B = self._check_batch_size(batch_size)
        g = make_generator(generator)
        T100, E100 = self.sample_params(B, g)
        T, E = T100.to(torch.float64) / 100, E100.to(torch.float64) / 100
        u_s = torch.rand(B, self.K, generator=g, dtype=torch.float64)
        u_o = torch.rand(B, self.K, generator=g, dtype=torch.float64)
        cT, cE = T.cumsum(-1), E.cumsum(-1)
        cT[..., -1] = 1.0
        cE[..., -1] = 1.0
        ar = torch.arange(B)
        states = torch.empty(B, self.K, dtype=torch.long)
        s = (u_s[:, 0] * self.S).floor().to(torch.long).clamp_max(self.S - 1)  # uniform start
        for k in range(self.K):
            if k > 0:
                s = torch.searchsorted(cT[ar, s], u_s[:, k : k + 1].contiguous()).squeeze(-1)
            states[:, k] = s
        obs = torch.searchsorted(cE[ar[:, None], states], u_o[..., None]).squeeze(-1)
        post = forward_filter(T, E, obs)
        return TaskBatch(
            tokens=tokenise_hmm(T100, E100, obs),
            positions=self.positions,
            answer_tokens=self.answer_tokens,
            posterior=post,
            targets=states,
        )
