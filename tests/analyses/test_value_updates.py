"""Value-update alignment: the value-step oracle, GQA, no side effects, results."""

import copy
import json

import numpy as np
import pytest
import torch
from helpers import hook_count, make_model

from bayesmanifold.analyses.value_updates import kept_bundles, value_update_alignment
from bayesmanifold.backends import model_access
from bayesmanifold.errors import ConfigError, InputError
from bayesmanifold.hooks import next_token_loss
from bayesmanifold.hooks.interventions import parameter_names, stepped_copy


def test_value_step_matches_kernel_of_capture_gradient(gen):
    """Oracle for the pieces value_update_alignment uses: after SGD on W_V/b_V only, layer 0's
    observed Δv equals −η (X Xᵀ + 1) ∂L/∂v, with X the ln1 output and ∂L/∂v from capture."""
    model = make_model(dtype=torch.float64)
    toks = torch.randint(0, 50, (2, 8), generator=gen)
    obj, lr = next_token_loss(None), 0.05
    kept = kept_bundles(model, toks, [0], objective=obj, sites=("v", "resid_pre"))
    new, _ = stepped_copy(model, toks, lr=lr, params=parameter_names(model, "values", layers=[0, 1]), objective=obj)
    after = kept_bundles(new, toks, [0], gradients=False, sites=("v",))
    with torch.no_grad():
        X = model_access(model).key_layer_norm(0)(kept[0].acts["resid_pre"]).flatten(0, 1)  # (b·k) d
    G = kept[0].grad_values.flatten(0, 1)  # (b·k) kv d
    pred = -lr * torch.einsum("nm,mhd->nhd", X @ X.T + 1, G)
    obs = (after[0].acts["v"] - kept[0].acts["v"]).flatten(0, 1)
    torch.testing.assert_close(obs, pred, rtol=1e-8, atol=1e-12)


def test_value_update_alignment_gqa_and_no_side_effects(gen):
    model = make_model(dtype=torch.float64, n_key_value_heads=2)
    ref = copy.deepcopy(model.state_dict())
    n0 = hook_count(model)
    toks = torch.randint(0, 50, (2, 10), generator=gen)
    res = value_update_alignment(model, toks, params="values", lr=0.01)
    assert res.cosine.shape == (2, 2)
    assert np.all(np.abs(res.cosine) <= 1 + 1e-9) and np.all(res.relative_change > 0)
    # a step on the values moves them, on average, along the responsibility-weighted direction
    assert res.cosine[0].mean() > 0
    for k, v in model.state_dict().items():
        assert torch.equal(v, ref[k]), k
    assert hook_count(model) == n0
    assert all(p.grad is None for p in model.parameters())
    assert len(res.to_dataframe()) == 4
    d = json.loads(json.dumps(res.to_dict()))
    assert d["params"] == "values" and np.asarray(d["cosine"]).shape == (2, 2)


def test_custom_optimizer_padding_and_errors(gen):
    import matplotlib

    matplotlib.use("Agg")
    model = make_model(dtype=torch.float64)
    toks = torch.randint(0, 50, (2, 10), generator=gen)
    mask = torch.ones(2, 10, dtype=torch.long)
    mask[1, 7:] = 0
    res = value_update_alignment(model, toks, attention_mask=mask, layers=[1],
                                 optimizer_factory=lambda ps: torch.optim.Adam(ps, lr=1e-3))
    assert res.layers == [1] and np.isfinite(res.cosine).all()
    assert res.plot() is not None
    with pytest.raises(InputError, match="params"):
        value_update_alignment(model, toks, params="qk")
    with pytest.raises(ConfigError, match="lr"):
        value_update_alignment(model, toks, lr=-1.0)
