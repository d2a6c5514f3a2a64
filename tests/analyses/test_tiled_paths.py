"""The tiled fast paths against the plain formulas they replace: attention entropy per row, and the
per-head value updates Σ_i α_ij u_i shared by the routing check and ValueUpdateNorms."""

import pytest
import torch

from bayesmanifold.analyses.attention import AttentionEntropyAccumulator, row_entropy
from bayesmanifold.analyses.headstats import layer_tiles
from bayesmanifold.analyses.routing_law import value_updates
from bayesmanifold.analyses.stats import entropy
from bayesmanifold.corpus.measures import ValueUpdateNorms
from bayesmanifold.hooks.bundle import LayerBundle


def _bundle(gen, dtype, batch=2, heads=4, kv=2, pos=70, d=8):
    """A causal layer with random scores, values and upstream gradients (GQA: ``heads`` over ``kv``)."""
    causal = torch.ones(pos, pos, dtype=torch.bool).tril()
    scores = torch.randn(batch, heads, pos, pos, generator=gen, dtype=dtype).masked_fill(~causal, torch.finfo(dtype).min)
    pattern = scores.softmax(-1)
    valid = causal.expand(batch, pos, pos)
    kv_heads = [h // (heads // kv) for h in range(heads)]
    values = torch.randn(batch, pos, kv, d, generator=gen, dtype=dtype)[:, :, kv_heads]  # per query head, as capture hands them
    return LayerBundle(
        layer=0, heads=list(range(heads)), kv_heads=kv_heads, attn_scale=None, pattern=pattern, values=values,
        grad_z=torch.randn(batch, pos, heads, d, generator=gen, dtype=dtype), grad_pattern=None, grad_scores=None,
        grad_values=torch.zeros(batch, pos, kv, d, dtype=dtype), valid=valid, query_valid=valid.any(-1),
        n_heads=heads, n_kv_heads=kv,
    )


@pytest.mark.parametrize("dtype, rtol", [(torch.float32, 2e-6), (torch.float64, 1e-12)])
def test_row_entropy_matches_the_float64_formula(gen, dtype, rtol):
    b = _bundle(gen, dtype)
    ref = entropy(b.pattern)
    tiled = row_entropy(b.pattern, layer_tiles(b))  # causal tiles: keys past each block are left out
    full = row_entropy(b.pattern)
    assert tiled.dtype == torch.float64
    torch.testing.assert_close(tiled, ref, rtol=rtol, atol=rtol)
    torch.testing.assert_close(full, ref, rtol=rtol, atol=rtol)
    assert float(tiled[:, :, 0].abs().max()) == 0.0  # the first query sees one key: H = 0 exactly
    acc = AttentionEntropyAccumulator([0], 4)
    acc.add(0, b.pattern, torch.ones(2, 70, dtype=torch.bool), tile_list=layer_tiles(b))
    torch.testing.assert_close(torch.as_tensor(acc.finalize().per_head[0]), ref.mean((0, 2)), rtol=rtol, atol=rtol)


def test_row_entropy_of_one_hot_and_uniform_rows():
    pat = torch.zeros(1, 2, 1, 4)
    pat[0, 0, 0, 0] = 1.0
    pat[0, 1, 0] = 0.25
    h = row_entropy(pat)
    assert float(h[0, 0, 0]) == 0.0
    assert float(h[0, 1, 0]) == pytest.approx(torch.log(torch.tensor(4.0, dtype=torch.float64)).item(), rel=1e-7)


def test_value_updates_match_the_einsum_and_are_shared(gen):
    b = _bundle(gen, torch.float64)
    ref = torch.einsum("bhqk,bqhd->bhdk", b.pattern, b.grad_z)
    got = value_updates(b)
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)
    assert value_updates(b) is got  # formed once per bundle
    norms = ValueUpdateNorms()
    norms.update(b)
    rows = norms.finalize()
    want = torch.linalg.vector_norm(ref, dim=2).mean((0, 2))  # [head]: every key is attended to
    torch.testing.assert_close(torch.tensor([r["value_update_norm_mean"] for r in rows], dtype=torch.float64), want,
                               rtol=1e-12, atol=1e-12)
