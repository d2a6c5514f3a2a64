"""The sticky Markov chain of Paper II's EM-vs-SGD experiment (arXiv 2512.22473, section 5.2).

Eight hidden states follow a Markov chain whose off-diagonal transition weight is ``1/d`` with
``d`` the circular distance between states. The authors' released code places the stickiness
``s`` on the diagonal, rescales each row to ``1 - s`` and *then* adds ``s`` on the diagonal again,
so the effective self-transition is 0.3498 for the stated ``s = 0.3`` (row 0 is
``[0.3498, 0.1660, 0.0830, 0.0553, 0.0415, 0.0553, 0.0830, 0.1660]``). Both constructions are offered: ``literal_stickiness=False`` (default)
reproduces the released code, ``True`` gives a self-transition of exactly ``s``.

Observations are continuous: with symbol means ``mu ∈ R^{8×20}`` drawn once from ``N(0, 1)``
(seed 0), the input at time ``t`` is ``x_t = mu[y_{t-1}] + N(0, I_20)`` and the target is
``y_t``. The Bayes-optimal predictor that knows ``y_{t-1}`` has cross-entropy equal to the
chain's entropy rate ``H_min`` = mean row entropy (the stationary law is uniform because the
matrix is circulant): 1.8292 nats = 2.639 bits for the released construction.

Random streams: the means come from a ``torch.Generator`` seeded with ``mean_seed``; the state
sequence and the noise come from the generator (or seed) passed to :func:`sample_sticky_chain`,
in the order start state (``randint``), one ``multinomial`` draw per transition, then the noise
(``randn``). With a generator seeded ``s`` this is the same stream as the released script after
``torch.manual_seed(s)``.

Example:
    >>> from bayesmanifold.windtunnels.sticky_chain import StickyChainConfig, sample_sticky_chain
    >>> data = sample_sticky_chain(StickyChainConfig(), seed=0)
    >>> data.inputs.shape, data.targets.shape
    (torch.Size([1999, 20]), torch.Size([1999]))
    >>> round(data.h_min_nats, 4)
    1.8292
"""

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor

from ..errors import TaskError
from .base import make_generator

__all__ = [
    "StickyChainConfig",
    "StickyChainData",
    "sticky_transition_matrix",
    "entropy_rate_nats",
    "sample_sticky_chain",
]


def _check_stickiness(stickiness: float) -> float:
    if isinstance(stickiness, bool) or not isinstance(stickiness, (int, float)):
        raise TaskError(f"stickiness must be a number in [0, 1); got {stickiness!r}")
    s = float(stickiness)
    if not (0.0 <= s < 1.0) or math.isnan(s):
        raise TaskError(f"stickiness must lie in [0, 1); got {stickiness!r}")
    return s


def sticky_transition_matrix(
    n_states: int = 8, stickiness: float = 0.3, *, literal_stickiness: bool = False
) -> Float[Tensor, "n_states n_states"]:
    """The sticky chain's transition matrix (float64, rows sum to 1).

    Args:
        n_states: number of states (at least 2).
        stickiness: ``s`` in ``[0, 1)``.
        literal_stickiness: if False (default), the released code's construction: the diagonal
            holds ``s`` *before* each row is rescaled to ``1 - s``, and ``s`` is added after, so
            the self-transition is ``s + (1 - s) s / (s + Σ_{d} 1/d)`` (0.3498 for ``s = 0.3``).
            If True, the off-diagonal ``1/d`` weights are rescaled to ``1 - s`` and the diagonal
            is exactly ``s``.

    Returns:
        ``P[i, j] = p(y_t = j | y_{t-1} = i)``.
    """
    if isinstance(n_states, bool) or not isinstance(n_states, int) or n_states < 2:
        raise TaskError(f"n_states must be an int >= 2; got {n_states!r}")
    s = _check_stickiness(stickiness)
    idx = torch.arange(n_states)
    diff = (idx[:, None] - idx[None, :]).abs()
    dist = torch.minimum(diff, n_states - diff).to(torch.float64)
    eye = torch.eye(n_states, dtype=torch.float64)
    off = torch.where(dist > 0, 1.0 / dist.clamp_min(1.0), torch.zeros_like(dist))
    base = off if literal_stickiness else off + s * eye
    P = base / base.sum(1, keepdim=True) * (1.0 - s) + s * eye
    return P / P.sum(1, keepdim=True)


def entropy_rate_nats(P: Float[Tensor, "n n"]) -> float:
    """Mean row entropy of ``P`` in nats: the entropy rate when the stationary law is uniform."""
    P = P.to(torch.float64)
    logp = torch.where(P > 0, P.clamp_min(1e-300).log(), torch.zeros_like(P))
    return float(-(P * logp).sum(1).mean())


@dataclass(frozen=True, kw_only=True)
class StickyChainConfig:
    """Parameters of the sticky chain (defaults: the paper's setting).

    Attributes:
        n_states: hidden states (8).
        d_input: dimension of the observations (20).
        length: length of the state sequence ``y_1..y_length`` (2000); the task has
            ``length - 1`` input/target pairs.
        stickiness: ``s`` in ``[0, 1)`` (0.3).
        literal_stickiness: self-transition exactly ``s`` instead of the released code's 0.3498.
        mean_seed: seed of the symbol means ``mu`` (0).
        noise_std: standard deviation of the observation noise (1).
    """

    n_states: int = 8
    d_input: int = 20
    length: int = 2000
    stickiness: float = 0.3
    literal_stickiness: bool = False
    mean_seed: int = 0
    noise_std: float = 1.0

    def __post_init__(self) -> None:
        for name, lo in (("n_states", 2), ("d_input", 1), ("length", 2)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise TaskError(f"{name} must be an int >= {lo}; got {v!r}")
        _check_stickiness(self.stickiness)
        if not isinstance(self.mean_seed, int) or isinstance(self.mean_seed, bool):
            raise TaskError(f"mean_seed must be an int; got {self.mean_seed!r}")
        if not isinstance(self.noise_std, (int, float)) or not (self.noise_std >= 0):
            raise TaskError(f"noise_std must be a number >= 0; got {self.noise_std!r}")

    @property
    def transition_matrix(self) -> Float[Tensor, "n_states n_states"]:
        return sticky_transition_matrix(
            self.n_states, self.stickiness, literal_stickiness=self.literal_stickiness
        )

    @property
    def h_min_nats(self) -> float:
        """Entropy rate of the chain in nats: the cross-entropy of the Bayes-optimal predictor."""
        return entropy_rate_nats(self.transition_matrix)

    @property
    def h_min_bits(self) -> float:
        return self.h_min_nats / math.log(2.0)

    def means(self) -> Float[Tensor, "n_states d_input"]:
        """The symbol means ``mu ~ N(0, 1)`` drawn from a generator seeded ``mean_seed``."""
        g = torch.Generator().manual_seed(self.mean_seed)
        return torch.randn(self.n_states, self.d_input, generator=g)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "StickyChainConfig":
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise TaskError(f"unknown StickyChainConfig fields {sorted(unknown)}")
        return cls(**d)


@dataclass(frozen=True, eq=False)
class StickyChainData:
    """One sampled sequence of the sticky chain.

    Attributes:
        inputs: ``[pos, d_input]`` with ``inputs[t] = mu[states[t]] + noise`` (float32).
        targets: ``[pos]`` the next state ``states[t + 1]``.
        states: ``[length]`` the hidden state sequence.
        means: ``[n_states, d_input]`` the symbol means.
        transition: ``[n_states, n_states]`` the transition matrix (float64).
        config: the generating configuration.
    """

    inputs: Float[Tensor, "pos d_input"]
    targets: Int[Tensor, " pos"]
    states: Int[Tensor, " length"]
    means: Float[Tensor, "n_states d_input"]
    transition: Float[Tensor, "n_states n_states"]
    config: StickyChainConfig = field(repr=False)

    @property
    def h_min_nats(self) -> float:
        return entropy_rate_nats(self.transition)

    @property
    def h_min_bits(self) -> float:
        return self.h_min_nats / math.log(2.0)

    @property
    def previous_states(self) -> Int[Tensor, " pos"]:
        """``y_{t-1}`` for each input: the group whose mean the input carries."""
        return self.states[:-1]

    def bayes_predictive(self) -> Float[Tensor, "pos n_states"]:
        """Exact next-state law given the (hidden) previous state: ``P[y_{t-1}]``."""
        return self.transition[self.previous_states]

    def bayes_loss_nats(self) -> float:
        """Empirical cross-entropy of the Bayes-optimal predictor on this sample (nats)."""
        p = self.transition[self.previous_states, self.targets]
        return float(-p.log().mean())

    def to_dataframe(self):
        """One row per position: previous state, target, Bayes probability of the target."""
        import pandas as pd

        return pd.DataFrame(
            {
                "pos": torch.arange(self.targets.numel()).numpy(),
                "previous_state": self.previous_states.numpy(),
                "target": self.targets.numpy(),
                "bayes_prob": self.transition[self.previous_states, self.targets].numpy(),
            }
        )

    def plot(self, ax=None):
        """Heat map of the transition matrix with the entropy rate in the title."""
        import matplotlib.pyplot as plt

        if ax is None:
            _, ax = plt.subplots(figsize=(4, 3.5))
        im = ax.imshow(self.transition.numpy(), cmap="viridis")
        ax.figure.colorbar(im, ax=ax)
        ax.set_xlabel("next state")
        ax.set_ylabel("previous state")
        ax.set_title(f"H_min = {self.h_min_nats:.4f} nats = {self.h_min_bits:.3f} bits")
        return ax


def sample_sticky_chain(
    config: StickyChainConfig | None = None,
    *,
    seed: "int | torch.Generator | None" = None,
    generator: torch.Generator | None = None,
) -> StickyChainData:
    """Sample one sequence of the sticky chain.

    Args:
        config: the chain's parameters (default: the paper's).
        seed: an int seed (or a generator) for the state sequence and the noise.
        generator: alternatively, a CPU ``torch.Generator`` (consumed in place).

    Returns:
        The sampled :class:`StickyChainData` (CPU tensors).

    Raises:
        TaskError: neither or both of ``seed`` and ``generator`` given, or a bad config.
    """
    config = StickyChainConfig() if config is None else config
    if not isinstance(config, StickyChainConfig):
        raise TaskError(f"config must be a StickyChainConfig; got {type(config).__name__}")
    if (seed is None) == (generator is None):
        raise TaskError("give exactly one of seed= or generator= to sample_sticky_chain")
    g = make_generator(seed if generator is None else generator)
    P = config.transition_matrix
    P32 = P.to(torch.float32)  # the released code samples from a float32 matrix
    mu = config.means()
    states = torch.empty(config.length, dtype=torch.long)
    states[0] = torch.randint(config.n_states, (1,), generator=g)
    for t in range(1, config.length):
        states[t] = torch.multinomial(P32[states[t - 1]], 1, generator=g)
    noise = torch.randn(config.length - 1, config.d_input, generator=g)
    inputs = mu[states[:-1]] + config.noise_std * noise
    return StickyChainData(
        inputs=inputs,
        targets=states[1:].clone(),
        states=states,
        means=mu,
        transition=P,
        config=config,
    )
