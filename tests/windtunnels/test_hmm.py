"""HMM filtering: forward-algorithm posteriors against brute force over all state paths."""

import itertools

import pytest
import torch

from bayesmanifold.errors import TaskError
from bayesmanifold.windtunnels import HMMTask
from bayesmanifold.windtunnels.hmm import EMIT, OBS, SEP, SYMBOL0, TRANS, discretise_rows


def decode(tokens: torch.Tensor, S: int, O: int):  # noqa: E741
    """T, E and observations read back from one token sequence."""
    assert tokens[0] == TRANS and tokens[1 + S * S] == EMIT and tokens[2 + S * S + S * O] == SEP
    T = (tokens[1 : 1 + S * S].double() + 5).view(S, S) / 100
    E = (tokens[2 + S * S : 2 + S * S + S * O].double() + 5).view(S, O) / 100
    rest = tokens[3 + S * S + S * O :]
    assert torch.all(rest[0::2] == OBS)
    return T, E, (rest[1::2] - SYMBOL0).tolist()


def brute_filter(T, E, obs, t):
    """p(s_t | o_1..t) by summing over all S^t state paths (uniform start)."""
    S = T.shape[0]
    post = torch.zeros(S, dtype=torch.float64)
    for path in itertools.product(range(S), repeat=t + 1):
        p = 1.0 / S * E[path[0], obs[0]]
        for k in range(1, t + 1):
            p = p * T[path[k - 1], path[k]] * E[path[k], obs[k]]
        post[path[-1]] += p
    return post / post.sum()


@pytest.mark.parametrize("S,O,K", [(5, 5, 4), (3, 4, 6)])
def test_filtering_matches_brute_force(S, O, K):  # noqa: E741
    task = HMMTask(S=S, O=O, K=K)
    batch = task.sample(3, generator=11)
    for b in range(3):
        T, E, obs = decode(batch.tokens[b], S, O)
        for t in range(K):
            torch.testing.assert_close(batch.posterior[b, t], brute_filter(T, E, obs, t),
                                       rtol=1e-10, atol=1e-12)


def test_tokenisation_layout():
    task = HMMTask()
    assert task.d_vocab == 105 and task.seq_len == 53 + 2 * 20
    batch = task.sample(16, generator=0)
    assert batch.tokens.shape == (16, 93)
    probs = torch.cat([batch.tokens[:, 1:26], batch.tokens[:, 27:52]], 1)
    assert probs.min() >= 0 and probs.max() <= 95  # 0.05 .. 1.00
    obs_pos = batch.positions
    assert torch.all(batch.tokens[:, obs_pos - 1] == OBS)
    assert torch.all((batch.tokens[:, obs_pos] >= SYMBOL0) & (batch.tokens[:, obs_pos] < 105))
    assert torch.equal(batch.answer_tokens, torch.arange(100, 105))
    # every row of T and E sums to exactly 1.00
    rows = (probs.view(16, 10, 5) + 5).sum(-1)
    assert torch.all(rows == 100)


def test_discretise_rows_exact_grid():
    g = torch.Generator().manual_seed(0)
    e = -torch.rand(2000, 5, generator=g, dtype=torch.float64).log()
    p = e / e.sum(-1, keepdim=True)  # Dirichlet(1) rows
    r = discretise_rows(p)
    assert torch.all(r.sum(-1) == 100) and r.min() >= 5 and r.max() <= 80
    q = p.clamp_min(0.05)
    q = q / q.sum(-1, keepdim=True)
    assert torch.all((r - q * 100).abs() < 2)  # rounding of the floored, renormalised rows
    edge = discretise_rows(torch.tensor([[0.0, 0, 0, 0, 1], [0.2] * 5, [0.199, 0.201, 0.2, 0.2, 0.2]]))
    assert edge.tolist() == [[5, 5, 5, 5, 80], [20] * 5, [20, 20, 20, 20, 20]]


def test_sampling_statistics():
    """First state uniform, first observation distributed as the mean emission row."""
    task = HMMTask(K=2)
    batch = task.sample(10000, generator=5)
    freq = torch.bincount(batch.targets[:, 0], minlength=5).double() / 10000
    assert (freq - 0.2).abs().max() < 0.015
    E = (batch.tokens[:, 27:52].double() + 5).view(-1, 5, 5) / 100
    first_obs = batch.tokens[:, batch.positions[0]] - SYMBOL0
    p_emit = E[torch.arange(10000), batch.targets[:, 0]]  # row of the true state
    # the realised symbol's probability under the true state's row beats a random row's
    mean_true = p_emit.gather(1, first_obs[:, None]).mean()
    mean_other = E[torch.arange(10000), (batch.targets[:, 0] + 1) % 5].gather(1, first_obs[:, None]).mean()
    assert mean_true > mean_other + 0.02
    # calibration of the posterior itself: E[onehot(state)] = E[posterior]
    onehot = torch.nn.functional.one_hot(batch.targets[:, 1], 5).double().mean(0)
    assert (onehot - batch.posterior[:, 1].mean(0)).abs().max() < 0.015


def test_with_K_and_seeding():
    task = HMMTask(K=20)
    assert task.with_K(50).seq_len == 153
    state = torch.get_rng_state()
    a, b = task.sample(4, 3), task.sample(4, 3)
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.posterior, b.posterior)
    assert torch.equal(state, torch.get_rng_state())


@pytest.mark.parametrize("kwargs", [dict(S=1), dict(O=1), dict(S=21), dict(K=0), dict(S=2.5)])
def test_impossible_parameters(kwargs):
    with pytest.raises(TaskError):
        HMMTask(**kwargs)


def test_empty_batch():
    with pytest.raises(TaskError, match="batch_size"):
        HMMTask().sample(0, generator=0)


def test_window_filter_baselines():
    task = HMMTask(K=6)
    b = task.sample(64, generator=3)
    em = task.window_posterior(b.tokens, 1)
    assert em.shape == b.posterior.shape
    torch.testing.assert_close(em[:, 0], b.posterior[:, 0])  # uniform initial law: only E matters
    assert (em[:, 1:] - b.posterior[:, 1:]).abs().max() > 0.05  # later, the transitions matter
    # window 1 by hand for one sequence: E[s, o_t] normalised over s
    T, E, obs = decode(b.tokens[0], 5, 5)
    E_o = E[:, obs].T
    torch.testing.assert_close(em[0], E_o / E_o.sum(-1, keepdim=True))
    # window 2 by hand at t = 3: uniform at t = 2, one transition, two emissions
    f = E[:, obs[2]] / E[:, obs[2]].sum()
    f = (f @ T) * E[:, obs[3]]
    torch.testing.assert_close(task.window_posterior(b.tokens, 2)[0, 3], f / f.sum())
    # a window as long as the sequence is the exact filter
    torch.testing.assert_close(task.window_posterior(b.tokens, 6), b.posterior)
    with pytest.raises(TaskError):
        task.window_posterior(b.tokens[:, :10])
    with pytest.raises(TaskError):
        task.window_posterior(torch.zeros_like(b.tokens))
    with pytest.raises(TaskError):
        task.window_posterior(b.tokens, 0)
