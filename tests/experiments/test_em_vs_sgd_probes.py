"""Probes of the sticky-chain runs through the library's capture, on the HookedRootModule head."""

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from bayesmanifold.analyses import RoutingLawCheck
from bayesmanifold.errors import InputError
from bayesmanifold.experiments.em_vs_sgd import attention_forward_backward, init_weights
from bayesmanifold.experiments.em_vs_sgd.probes import probe_checkpoints, stabilisation_step
from bayesmanifold.experiments.em_vs_sgd.sticky_models import SingleHeadHooked
from bayesmanifold.hooks import capture
from bayesmanifold.windtunnels.sticky_chain import StickyChainConfig, sample_sticky_chain


@pytest.fixture
def data():
    return sample_sticky_chain(StickyChainConfig(length=31), seed=3)


def _weights(seed=7, dtype=torch.float64, scale=0.5):
    return [w.to(dtype) * (scale / 0.1) for w in init_weights(seed)]


def test_hooked_head_matches_hand_pass(data):
    W = _weights()
    model = SingleHeadHooked(*W)
    x = data.inputs.double()[None]
    logits = model(x)
    loss = F.cross_entropy(logits[0], data.targets)
    o = attention_forward_backward(x, data.targets[None], *(w[None] for w in W), tile=8)
    assert float(o.loss[0]) == pytest.approx(float(loss.detach()), abs=1e-12)
    names = set(model.hook_dict)
    for h in ("hook_attn_scores", "hook_pattern", "hook_v", "hook_z"):
        assert f"blocks.0.attn.{h}" in names
    with pytest.raises(InputError):
        model(torch.zeros(1, 4, 3))


def test_routing_law_through_capture_float64(data):
    W = _weights()
    model = SingleHeadHooked(*W)
    x = data.inputs.double()[None]
    y = data.targets
    check = RoutingLawCheck()
    with capture(model, accumulators=[check], keep=True, objective=lambda lg, _x: F.cross_entropy(lg[0], y)) as cap:
        cap.run(x)
        b = cap.kept[0]
    res = check.finalize()
    assert res.max_rel_residual_dscores < 1e-10
    assert res.max_abs_residual_dvalues < 1e-14
    # against independent autograd on the same head: ∂L/∂s = α ⊙ (b − b̄), ∂L/∂v = Σ_i α_ij u_i
    alpha, u, v = b.pattern[0, 0], b.grad_z[0, :, 0], b.values[0, :, 0]
    compat = u @ v.T
    law = alpha * (compat - (alpha * compat).sum(-1, keepdim=True))
    assert torch.allclose(b.grad_scores[0, 0], law, atol=1e-14)
    assert torch.allclose(b.grad_values[0, :, 0], alpha.T @ u, atol=1e-14)
    # u is the mean-loss gradient: the hand pass's responsibility sums agree
    o = attention_forward_backward(x, y[None], *(w[None] for w in W), tile=8, responsibility_rows=torch.tensor([0]))
    assert torch.allclose(o.resp_u[0], alpha.T @ u, atol=1e-14)
    # capture leaves no hook behind
    for hp in model.hook_dict.values():
        assert not hp._forward_hooks and not hp._backward_hooks


def test_probe_checkpoints_rows_and_zero_drift(data):
    W = tuple(w.float() for w in _weights())
    W2 = tuple(w * 1.1 for w in W)
    snaps = {"sgd": [(0, W), (5, W), (10, W2)]}
    res = probe_checkpoints(snaps, data.inputs, data.targets, data.previous_states)
    df = res.to_dataframe()
    assert list(df.step) == [0, 5, 10]
    assert math.isnan(df.js_drift_per_step[0])
    assert df.js_drift_per_step[1] == pytest.approx(0, abs=1e-12)
    assert df.value_drift_per_step[1] == pytest.approx(0, abs=1e-12)
    assert df.value_drift_per_step[2] == pytest.approx(0.1 / 5, rel=1e-5)  # V scales by 1.1 over 5 steps
    assert df.js_drift_per_step[2] > 0
    assert ((df.mass_positive >= 0) & (df.mass_positive <= 1)).all()
    assert ((df.spec_entropy > 0) & (df.spec_entropy <= 1 + 1e-9)).all()
    assert df.routing_rel_residual.max() < 1e-4
    assert "sgd" in res.summary
    back = json.loads(json.dumps(res.to_dict()))  # JSON-safe (NaN drifts stay floats)
    assert back["summary"] == json.loads(json.dumps(res.summary)) and len(back["rows"]) == 3


def test_stabilisation_step():
    steps = np.array([10, 20, 30, 40, 50])
    assert stabilisation_step(steps, np.array([1.0, 0.5, 0.2, 0.05, 0.01])) == 40
    assert stabilisation_step(steps, np.array([1.0, 0.5, 0.2, 0.15, 0.11])) is None
    assert stabilisation_step(steps, np.array([1.0, 0.01, 0.01, 0.01, 0.01])) == 20
