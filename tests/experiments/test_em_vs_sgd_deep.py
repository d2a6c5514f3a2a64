"""The deep TransformerLens variant of the sticky-chain experiment (tiny sizes)."""

import pytest
import torch
from helpers import needs_hooked

from bayesmanifold.errors import ConfigError, TaskError
from bayesmanifold.experiments.em_vs_sgd.deep import DeepConfig, run_deep_variant
from bayesmanifold.experiments.em_vs_sgd.sticky_models import DeepStickyModel


@needs_hooked
def test_start_at_layer_skips_embeddings_and_is_causal():
    m = DeepStickyModel(n_layers=2, d_model=16, n_heads=2)
    x = torch.randn(1, 12, 20, generator=torch.Generator().manual_seed(0))
    out = m(x)
    h = m.input_proj(x)
    for block in m.transformer.blocks:
        h = block(h)
    assert torch.allclose(out, m.transformer.unembed(m.transformer.ln_final(h)))
    x2 = x.clone()
    x2[0, 8:] += 5.0
    assert torch.allclose(m(x2)[0, :8], out[0, :8])
    before = torch.random.get_rng_state()
    DeepStickyModel(n_layers=1, d_model=8, n_heads=2, seed=3)
    assert torch.equal(before, torch.random.get_rng_state())


@needs_hooked
def test_tiny_run_reports_gap_to_h_min():
    res = run_deep_variant(DeepConfig(steps=3, n_layers=1, d_model=16, n_heads=2))
    s = res.summary()
    for m in ("adamw", "em_like"):
        assert s[m]["test_entropy_minus_h_min"] == pytest.approx(s[m]["test_entropy"] - res.h_min_nats)
    assert len(res.rows) == 2 and res.curves["adamw"].shape == (1, 3)
    # same init for both schedules: identical first loss
    assert res.curves["adamw"][0, 0] == pytest.approx(res.curves["em_like"][0, 0])


@pytest.mark.parametrize(
    "kwargs, err",
    [({"steps": 0}, ConfigError), ({"lr": -1.0}, ConfigError), ({"d_model": 10, "n_heads": 4}, ConfigError),
     ({"methods": ("sgd",)}, ConfigError), ({"stickiness": 1.0}, TaskError), ({"seeds": ()}, ConfigError)],
)
def test_bad_deep_config(kwargs, err):
    with pytest.raises(err):
        DeepConfig(**kwargs)
