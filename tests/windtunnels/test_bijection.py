"""Bijection elimination: posteriors against brute force over all bijections (Paper I §3.1)."""

import itertools
import math

import pytest
import torch

from bayesmanifold.errors import TaskError
from bayesmanifold.windtunnels import BijectionTask


def brute_posterior(tokens: torch.Tensor, V: int, t: int) -> torch.Tensor:
    """p(π(k_t) = v | first t pairs shown) by enumerating all V! bijections."""
    keys = tokens[0::2].tolist()
    vals = [v - V for v in tokens[1::2].tolist()]
    counts = torch.zeros(V, dtype=torch.float64)
    for perm in itertools.permutations(range(V)):
        if all(perm[keys[s]] == vals[s] for s in range(t)):
            counts[perm[keys[t]]] += 1
    return counts / counts.sum()


@pytest.mark.parametrize("replacement,L", [(False, 4), (True, 7)])
def test_posterior_matches_brute_force(replacement, L):
    V = 4
    task = BijectionTask(V=V, L=L, replacement=replacement)
    batch = task.sample(6, generator=3)
    for b in range(6):
        for t in range(L):
            expect = brute_posterior(batch.tokens[b], V, t)
            torch.testing.assert_close(batch.posterior[b, t], expect, rtol=0, atol=1e-12)


def test_entropy_curve_without_replacement():
    task = BijectionTask(V=20, L=19)
    batch = task.sample(16, generator=0)
    H = batch.bayes_entropy_bits()
    expect = torch.tensor([math.log2(20 - t + 1) for t in range(1, 20)], dtype=torch.float64)
    torch.testing.assert_close(H, expect.expand_as(H), rtol=0, atol=1e-12)
    torch.testing.assert_close(task.bayes_entropy_curve(), expect)


def test_repeated_key_has_zero_entropy():
    task = BijectionTask(V=5, L=12, replacement=True)
    batch = task.sample(32, generator=1)
    keys = batch.tokens[:, 0::2]
    H = batch.bayes_entropy_bits()
    seen = torch.zeros_like(H, dtype=torch.bool)
    expect_new = torch.zeros_like(H)
    for t in range(12):
        seen[:, t] = (keys[:, :t] == keys[:, t : t + 1]).any(-1)
        n_distinct = torch.tensor([len(set(keys[b, :t].tolist())) for b in range(32)])
        expect_new[:, t] = torch.log2((5 - n_distinct).double())
    assert seen.any()
    assert torch.all(H[seen] == 0)  # a repeated key's value is known
    torch.testing.assert_close(H[~seen], expect_new[~seen])  # new key: uniform over unused


def test_layout_and_consistency():
    V, L = 20, 19
    task = BijectionTask(V=V, L=L)
    batch = task.sample(8, generator=2)
    assert batch.tokens.shape == (8, 2 * L) and task.d_vocab == 2 * V
    keys, vals = batch.tokens[:, 0::2], batch.tokens[:, 1::2]
    assert keys.max() < V and vals.min() >= V and vals.max() < 2 * V
    for b in range(8):  # distinct keys map to distinct values
        assert len(set(keys[b].tolist())) == L and len(set(vals[b].tolist())) == L
    assert torch.equal(batch.positions, torch.arange(0, 2 * L, 2))
    assert torch.equal(batch.targets, vals - V)
    assert torch.equal(batch.answer_tokens, torch.arange(V, 2 * V))


def test_seeded_and_no_global_rng():
    task = BijectionTask(V=8, L=6)
    state = torch.get_rng_state()
    a = task.sample(4, generator=7)
    b = task.sample(4, generator=7)
    assert torch.equal(a.tokens, b.tokens)
    g = torch.Generator().manual_seed(7)
    c, d = task.sample(4, g), task.sample(4, g)
    assert torch.equal(c.tokens, a.tokens) and not torch.equal(c.tokens, d.tokens)
    assert torch.equal(state, torch.get_rng_state())


@pytest.mark.parametrize(
    "kwargs", [dict(V=4, L=5), dict(V=1, L=1), dict(V=4, L=0), dict(V=4.0, L=2),
               dict(V=4, L=2, replacement="yes")]
)
def test_impossible_parameters(kwargs):
    with pytest.raises(TaskError):
        BijectionTask(**kwargs)


def test_bad_batch_and_seed():
    task = BijectionTask(V=4, L=3)
    with pytest.raises(TaskError, match="batch_size"):
        task.sample(0, generator=0)
    with pytest.raises(TaskError, match="seed"):
        task.sample(2, generator=None)
