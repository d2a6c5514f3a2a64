"""Positive-feedback probe: finite, bounded, no side effects, results."""

import json

import numpy as np
import pytest
import torch
from helpers import hook_count, make_model

from bayesmanifold.analyses.feedback import positive_feedback_probe
from bayesmanifold.errors import ConfigError


def test_positive_feedback_probe_runs_and_is_finite(gen):
    model = make_model(dtype=torch.float64)
    n0 = hook_count(model)
    toks = torch.randint(0, 50, (2, 10), generator=gen)
    res = positive_feedback_probe(model, toks, lr=0.05)
    assert res.db_corr.shape == (2, 4)
    assert np.isfinite(res.db_corr).all() and np.isfinite(res.feedback_corr).all()
    assert ((res.sign_agreement >= 0) & (res.sign_agreement <= 1)).all()
    assert hook_count(model) == n0
    assert all(p.grad is None for p in model.parameters())
    d = json.loads(json.dumps(res.to_dict()))
    assert np.asarray(d["db_corr"]).shape == (2, 4) and len(res.to_dataframe()) == 8


def test_padding_gqa_plot_and_errors(gen):
    import matplotlib

    matplotlib.use("Agg")
    model = make_model(dtype=torch.float64, n_key_value_heads=2)
    toks = torch.randint(0, 50, (2, 10), generator=gen)
    mask = torch.ones(2, 10, dtype=torch.long)
    mask[1, 7:] = 0
    res = positive_feedback_probe(model, toks, lr=0.05, routing_lr=0.1, attention_mask=mask, layers=[-1])
    assert res.layers == [1] and np.isfinite(res.db_corr).all()
    assert res.plot() is not None
    with pytest.raises(ConfigError, match="routing_lr"):
        positive_feedback_probe(model, toks, routing_lr=0.0)
