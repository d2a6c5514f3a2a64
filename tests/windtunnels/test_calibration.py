"""Entropy-calibration MAE and KL on hand cases and against a Bayes-oracle model."""

import math

import pytest
import torch
from torch import nn

from bayesmanifold.analyses.logit_lens import logit_lens_kl
from bayesmanifold.errors import InputError
from bayesmanifold.models import build_model, preset_spec
from bayesmanifold.windtunnels import BijectionTask, HMMTask
from bayesmanifold.windtunnels.calibration import calibration_from_probs, measure_calibration
from bayesmanifold.windtunnels.hmm import forward_filter


class BijectionOracle(nn.Module):
    """Logits equal to the exact posterior: 0 on unrevealed values, -1e4 on revealed ones."""

    def __init__(self, V):
        super().__init__()
        self.V = V
        self.dummy = nn.Parameter(torch.zeros(()))

    def forward(self, tokens):
        B, P = tokens.shape
        out = torch.zeros(B, P, 2 * self.V)
        for p in range(0, P, 2):
            revealed = tokens[:, 1:p:2]
            out[:, p, self.V :] = 0.0
            for j in range(revealed.shape[1]):
                out[torch.arange(B), p, revealed[:, j]] = -1e4
        return out


def test_bayes_model_has_zero_error():
    task = BijectionTask(V=8, L=7)
    res = measure_calibration(BijectionOracle(8), task, n_seqs=64, generator=0)
    assert res.entropy_mae_bits < 1e-9 and res.kl_bits.abs().max() < 1e-9
    torch.testing.assert_close(res.bayes_entropy_bits,
                               torch.log2(8 - torch.arange(7, dtype=torch.float64)))
    assert res.n_seqs == 64 and res.positions.tolist() == [0, 2, 4, 6, 8, 10, 12]


def test_uniform_model_against_delta():
    post = torch.zeros(3, 2, 4, dtype=torch.float64)
    post[..., 1] = 1
    lp = torch.full_like(post, -math.log(4))
    res = calibration_from_probs(lp, post)
    assert res.entropy_mae_bits == pytest.approx(2.0)
    torch.testing.assert_close(res.kl_bits, torch.full((2,), 2.0, dtype=torch.float64))


def test_mae_averages_sequences_before_the_difference():
    """Paper I: |mean_n H_model − mean_n H_Bayes| per position, not mean_n |difference|."""
    delta = torch.tensor([1.0, 0.0], dtype=torch.float64)
    half = torch.tensor([0.5, 0.5], dtype=torch.float64)
    post = torch.stack([delta, half])[:, None, :]  # seq 0: Bayes H=0, seq 1: H=1
    model = torch.stack([half, delta])[:, None, :]  # the other way round
    res = calibration_from_probs(model.clamp_min(1e-300).log(), post)
    assert res.entropy_mae_bits == pytest.approx(0.0, abs=1e-12)
    assert res.mean_kl_bits > 1  # the KL is not fooled


def test_hmm_oracle_and_dataframe():
    task = HMMTask(K=6)
    b = task.sample(32, 1)
    res = calibration_from_probs(b.posterior.log(), b.posterior, b.positions, task="hmm")
    assert res.entropy_mae_bits == 0 and res.kl_bits.abs().max() < 1e-12
    df = res.to_dataframe()
    assert list(df["t"]) == list(range(1, 7)) and df["kl_bits"].abs().max() < 1e-12
    T = (b.tokens[:, 1:26].double() + 5).view(-1, 5, 5) / 100
    E = (b.tokens[:, 27:52].double() + 5).view(-1, 5, 5) / 100
    torch.testing.assert_close(forward_filter(T, E, b.tokens[:, b.positions] - 100), b.posterior)


def test_plot_and_errors():
    import matplotlib

    matplotlib.use("Agg")
    post = torch.full((2, 3, 4), 0.25, dtype=torch.float64)
    res = calibration_from_probs(post.log(), post)
    assert res.plot() is not None
    with pytest.raises(InputError):
        calibration_from_probs(post.log()[:, :2], post)
    with pytest.raises(InputError):
        calibration_from_probs(post.log()[:0], post[:0])
    with pytest.raises(InputError):
        measure_calibration(BijectionOracle(4), BijectionTask(V=4, L=3), n_seqs=0)


def test_logit_lens_last_layer_equals_model():
    task = BijectionTask(V=6, L=5)
    model = build_model(preset_spec("small", task), seed=0)
    ll = logit_lens_kl(model, task, n_seqs=32, generator=4)
    res = measure_calibration(model, task, n_seqs=32, generator=4)
    assert ll.layers == ("embed", "0", "1") and ll.kl_bits.shape == (3,)
    torch.testing.assert_close(ll.kl_bits[-1], res.kl_bits.mean(), rtol=1e-6, atol=1e-8)
    assert len(ll.to_dataframe()) == 3 * 5
    with pytest.raises(InputError):
        logit_lens_kl(BijectionOracle(6), task)
