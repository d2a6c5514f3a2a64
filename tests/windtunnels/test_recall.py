"""Associative recall: posteriors against brute force over the stored pairs."""

import pytest
import torch

from bayesmanifold.errors import TaskError
from bayesmanifold.windtunnels import RecallTask


def brute(tokens, task, q):
    """p(answer | query q) by looping over every stored pair a query could have picked."""
    N = task.N
    pairs = [(int(tokens[2 * i]), int(tokens[2 * i + 1]) - task.n_keys) for i in range(N)]
    qkey = int(tokens[task.positions[q]])
    counts = torch.zeros(task.n_values, dtype=torch.float64)
    for k, v in pairs:
        if k == qkey:
            counts[v] += 1
    return counts / counts.sum()


def test_posterior_matches_brute_force_with_ambiguous_keys():
    task = RecallTask(N=8, n_keys=4, n_values=6, F=3, Q=5)
    batch = task.sample(20, generator=0)
    ambiguous = 0
    for b in range(20):
        for q in range(task.Q):
            expect = brute(batch.tokens[b], task, q)
            torch.testing.assert_close(batch.posterior[b, q], expect, rtol=0, atol=1e-12)
            ambiguous += int((expect > 0).sum() > 1)
            assert expect[batch.targets[b, q]] > 0  # the realised answer is a candidate
    assert ambiguous > 0


def test_distinct_keys_give_deltas_and_layout():
    task = RecallTask(N=6, n_keys=10, n_values=10, F=2, Q=4, distinct_keys=True)
    batch = task.sample(10, generator=1)
    assert batch.tokens.shape == (10, task.seq_len)
    assert torch.all(batch.posterior.max(-1).values == 1)
    assert torch.equal(batch.posterior.argmax(-1), batch.targets)
    assert torch.all(batch.tokens[:, batch.positions - 1] == task.query_token)
    assert torch.all(batch.tokens[:, batch.positions + 1] == batch.targets + task.n_keys)
    assert batch.tokens.max() < task.d_vocab


@pytest.mark.parametrize("kwargs", [dict(N=0), dict(N=5, n_keys=4, distinct_keys=True),
                                    dict(n_values=1), dict(Q=0), dict(F=-1)])
def test_impossible_parameters(kwargs):
    with pytest.raises(TaskError):
        RecallTask(**kwargs)


def test_empty_batch():
    with pytest.raises(TaskError):
        RecallTask().sample(0, generator=0)
