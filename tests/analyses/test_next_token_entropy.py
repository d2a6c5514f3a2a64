"""The next-token entropy that Paper III's protocol and the text suite label value rows with."""

import torch

from bayesmanifold.analyses.features import next_token_entropy
from bayesmanifold.backends.batch import Batch
from bayesmanifold.hooks.bundle import OutputBundle


def _out(logits, positions=None, mask=None):
    toks = torch.zeros(logits.shape[:2], dtype=torch.long)
    return OutputBundle(batch=Batch(tokens=toks, positions=positions, attention_mask=mask), logits=logits, loss=None)


def test_equals_the_plain_formula_at_scored_positions_only():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 5, 11, generator=g)
    pos = torch.zeros(3, 5, dtype=torch.bool)
    pos[0, 4] = pos[1, 2] = pos[2, 0] = True
    mask = torch.ones(3, 5, dtype=torch.long)
    mask[1, 3:] = 0  # right padding
    got = next_token_entropy(_out(logits, pos, mask))
    p = torch.softmax(logits.double(), -1)
    plain = -(p * p.log()).sum(-1)
    assert got.dtype == torch.float64 and got.shape == (3, 5)
    assert torch.allclose(got[pos], plain[pos], rtol=0, atol=1e-12)
    assert torch.isnan(got[~pos]).all()
    every = next_token_entropy(_out(logits.clone(), None, mask))  # no positions: every real token
    assert torch.allclose(every[mask.bool()], plain[mask.bool()], atol=1e-12) and torch.isnan(every[~mask.bool()]).all()


def test_computed_once_per_pass_and_never_stale():
    logits = torch.randn(2, 4, 7)
    out = _out(logits)
    first = next_token_entropy(out)
    assert next_token_entropy(out) is first  # the second accumulator of the same pass reuses it
    logits2 = logits.clone()
    logits2[0, 0, 0] += 5.0
    again = next_token_entropy(_out(logits2))  # a new pass (new logits): recomputed
    assert again is not first and not torch.equal(again, first)
