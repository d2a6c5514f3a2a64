"""The sticky Markov chain of Paper II: transition matrix, entropy rate, sampling streams."""

import math

import pytest
import torch

from bayesmanifold.errors import TaskError
from bayesmanifold.windtunnels.sticky_chain import (
    StickyChainConfig,
    entropy_rate_nats,
    sample_sticky_chain,
    sticky_transition_matrix,
)

ROW0 = [0.3498, 0.1660, 0.0830, 0.0553, 0.0415, 0.0553, 0.0830, 0.1660]


def test_released_construction_row_and_entropy():
    P = sticky_transition_matrix()
    assert torch.allclose(P[0], torch.tensor(ROW0, dtype=torch.float64), atol=5e-5)
    assert torch.allclose(P.sum(1), torch.ones(8, dtype=torch.float64))
    for i in range(8):  # circulant: every row is row 0 rotated
        assert torch.allclose(P[i], torch.roll(P[0], i))
    cfg = StickyChainConfig()
    assert cfg.h_min_nats == pytest.approx(1.8292, abs=5e-5)
    assert cfg.h_min_bits == pytest.approx(2.639, abs=5e-4)
    # closed form of the effective self-transition: s + (1 - s) s / (s + Σ_{j≠0} 1/d_j)
    s, off = 0.3, 2 * (1 + 1 / 2 + 1 / 3) + 1 / 4
    assert float(P[0, 0]) == pytest.approx(s + (1 - s) * s / (s + off), abs=1e-12)


def test_literal_stickiness_is_exact():
    P = sticky_transition_matrix(stickiness=0.3, literal_stickiness=True)
    assert torch.allclose(P.diagonal(), torch.full((8,), 0.3, dtype=torch.float64))
    assert torch.allclose(P.sum(1), torch.ones(8, dtype=torch.float64))
    # brute-force entropy of row 0 equals the rate (uniform stationary law)
    row = P[0]
    assert entropy_rate_nats(P) == pytest.approx(float(-(row * row.log()).sum()), abs=1e-12)
    assert StickyChainConfig(literal_stickiness=True).h_min_nats > StickyChainConfig().h_min_nats


@pytest.mark.parametrize("bad", [-0.1, 1.0, 1.5, float("nan"), "0.3", True])
def test_bad_stickiness(bad):
    with pytest.raises(TaskError):
        sticky_transition_matrix(stickiness=bad)
    with pytest.raises(TaskError):
        StickyChainConfig(stickiness=bad)


def test_bad_sampling_arguments():
    with pytest.raises(TaskError):
        sample_sticky_chain(StickyChainConfig())
    with pytest.raises(TaskError):
        sample_sticky_chain(StickyChainConfig(), seed=0, generator=torch.Generator())
    with pytest.raises(TaskError):
        StickyChainConfig(length=1)


def test_sample_shapes_and_determinism_without_global_state():
    cfg = StickyChainConfig(length=300)
    before = torch.random.get_rng_state()
    a = sample_sticky_chain(cfg, seed=5)
    assert torch.equal(before, torch.random.get_rng_state())
    b = sample_sticky_chain(cfg, generator=torch.Generator().manual_seed(5))
    c = sample_sticky_chain(cfg, seed=6)
    assert a.inputs.shape == (299, 20) and a.targets.shape == (299,) and a.states.shape == (300,)
    assert torch.equal(a.inputs, b.inputs) and torch.equal(a.states, b.states)
    assert not torch.equal(a.states, c.states)
    assert torch.equal(a.means, c.means)  # the means come from mean_seed only
    assert torch.equal(a.targets, a.states[1:])
    noise = a.inputs - a.means[a.previous_states]
    assert 0.8 < float(noise.std()) < 1.2


def test_same_stream_as_released_script():
    """Oracle: the released script's global-RNG protocol, replayed in a forked RNG."""
    cfg = StickyChainConfig(length=200)
    P = cfg.transition_matrix.float()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        mu = torch.randn(8, 20)
        torch.manual_seed(42)
        seq = [torch.randint(8, (1,)).item()]
        for _ in range(199):
            seq.append(torch.multinomial(P[seq[-1]], 1).item())
        seq = torch.tensor(seq)
        x = mu[seq[:-1]] + torch.randn(199, 20)
    d = sample_sticky_chain(cfg, seed=42)
    assert torch.equal(d.states, seq)
    assert torch.equal(d.inputs, x)


def test_empirical_transitions_and_bayes_loss():
    d = sample_sticky_chain(StickyChainConfig(length=20000), seed=1)
    counts = torch.zeros(8, 8, dtype=torch.float64)
    counts.index_put_((d.states[:-1], d.states[1:]), torch.ones(19999, dtype=torch.float64), accumulate=True)
    emp = counts / counts.sum(1, keepdim=True)
    assert (emp - d.transition).abs().max() < 0.03
    assert d.bayes_loss_nats() == pytest.approx(d.h_min_nats, abs=0.03)
    assert d.bayes_predictive().shape == (19999, 8)
    assert math.isclose(d.h_min_bits * math.log(2), d.h_min_nats)


def test_config_round_trip_and_results_api():
    cfg = StickyChainConfig(stickiness=0.2, length=50)
    assert StickyChainConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(TaskError):
        StickyChainConfig.from_dict({"bogus": 1})
    d = sample_sticky_chain(cfg, seed=0)
    df = d.to_dataframe()
    assert list(df.columns) == ["pos", "previous_state", "target", "bayes_prob"] and len(df) == 49
    import matplotlib

    matplotlib.use("Agg")
    ax = d.plot()
    assert "H_min" in ax.get_title()
