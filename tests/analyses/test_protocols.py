"""The authors' protocols: oracles for the pooled PCA and the position control, and on a tiny model
the final-norm rows, the focusing that coincides with ours, and the HMM KL at K = 15."""

import numpy as np
import pytest
import torch
from helpers import hook_count

from bayesmanifold.analyses.final_manifold import final_manifold_stats
from bayesmanifold.analyses.protocols import PROTOCOLS, ProtocolConfig, measure_protocols
from bayesmanifold.errors import BayesManifoldError, ConfigError, InputError
from bayesmanifold.hooks import model_access
from bayesmanifold.models.presets import build_model, preset_spec
from bayesmanifold.windtunnels.bijection import BijectionTask
from bayesmanifold.windtunnels.hmm import HMMTask


def _synthetic(n_per=200, n_pos=5, d=6, pos_scale=3.0, seed=0):
    rng = np.random.default_rng(seed)
    pos = np.repeat(np.arange(n_pos), n_per)
    X = rng.normal(size=(len(pos), d))
    X[:, 0] += pos_scale * pos  # position along axis 0
    h = np.log2(10 - pos).astype(float)  # entropy a function of position (no replacement)
    return X, h, pos


def test_pooled_pca_matches_sklearn_and_pearson():
    from sklearn.decomposition import PCA

    X, h, pos = _synthetic()
    res = final_manifold_stats(X, h, pos)
    pca = PCA(n_components=5).fit(X)
    assert res.pc1_share == pytest.approx(pca.explained_variance_ratio_[0], rel=1e-9)
    assert res.pc12_share == pytest.approx(pca.explained_variance_ratio_[:2].sum(), rel=1e-9)
    scores = pca.transform(X)
    for i in range(5):  # PC signs are arbitrary: compare |r|
        assert abs(res.pearson_pcs[i]) == pytest.approx(abs(np.corrcoef(scores[:, i], h)[0, 1]), abs=1e-9)
    assert res.best_pc == 1 and abs(res.best_pearson) > 0.9


def test_position_control_separates_position_from_the_rest():
    X, h, pos = _synthetic(pos_scale=3.0)
    res = final_manifold_stats(X, h, pos)
    # PC1 is the position axis: position variance 9·Var(pos) = 18 against unit noise, so η² ≈ 18/19,
    # and position is 18 of the 18 + 6 units of total variance
    assert res.pc1_position_r2 == pytest.approx(18 / 19, abs=0.02)
    assert res.position_share == pytest.approx(18 / 24, abs=0.03)
    # within position the cloud is isotropic noise: PC1 ≈ 1/d
    assert res.within_pc1_share < 0.3
    Xw = X - np.stack([X[pos == p].mean(0) for p in pos])
    lam = np.linalg.eigvalsh(np.cov(Xw.T))
    assert res.within_pc1_share == pytest.approx(lam.max() / lam.sum(), rel=1e-9)
    assert res.within_pearson_pc1 is None  # entropy does not vary within a position
    X2, _, _ = _synthetic(pos_scale=0.0)
    assert final_manifold_stats(X2, h, pos).position_share < 0.05


def test_within_position_correlation_when_entropy_varies():
    rng = np.random.default_rng(1)
    pos = np.repeat(np.arange(4), 300)
    h = rng.uniform(0, 3, size=len(pos))
    X = rng.normal(size=(len(pos), 4)) * 0.1
    X[:, 1] += 5 * h  # an entropy axis that is not position
    res = final_manifold_stats(X, h, pos)
    assert abs(res.within_pearson_pc1) > 0.99


def test_bad_input_is_refused():
    with pytest.raises(InputError):
        final_manifold_stats(np.zeros((5, 3)), np.zeros(4), np.zeros(5))
    for bad in ({"n_seqs": 1}, {"hmm_K": 0}, {"seed": -1}, {"batch_size": True}):
        with pytest.raises(ConfigError):
            ProtocolConfig(**bad)
    with pytest.raises(BayesManifoldError):
        measure_protocols(object(), None)


@pytest.fixture(scope="module")
def bijection_model():
    task = BijectionTask(V=6, L=5)
    return build_model(preset_spec("small", task), seed=3).eval(), task


def test_bijection_protocols_on_a_tiny_model(bijection_model):
    model, task = bijection_model
    before = hook_count(model)
    res = measure_protocols(model, task, ProtocolConfig(n_seqs=64, seed=5, batch_size=16))
    assert hook_count(model) == before
    vm = res.numbers["value_manifold"]
    assert set(vm) == {"value_positions", "prefix_last"}
    assert vm["value_positions"]["n_samples"] == 64 * task.L and vm["value_positions"]["n_positions"] == task.L
    # the rows are the final norm's output: the same PCA from resid_post passed through the final norm
    from bayesmanifold.analyses.features import collect_features

    batch = task.sample(64, generator=5)
    pos = batch.positions + 1
    mask = torch.zeros(batch.tokens.shape, dtype=torch.bool)
    mask[:, pos] = True
    resid = collect_features(model, batch.tokens, kind="residual", layer=-1, positions=mask)
    final = model_access(model).final_norm(resid.double()).numpy()
    h = batch.bayes_entropy_bits().numpy().reshape(-1)
    ref = final_manifold_stats(final, h, np.tile(pos.numpy(), 64))
    assert vm["value_positions"]["pc1_share"] == pytest.approx(ref.pc1_share, rel=1e-4)
    assert vm["value_positions"]["best_pearson"] == pytest.approx(ref.best_pearson, abs=1e-4)
    assert "calibration" not in res.numbers  # the KL protocol is HMM's
    assert set(PROTOCOLS) >= {"value_manifold", "attention_focusing", "calibration", "frame_first"}


def test_authors_focusing_coincides_with_ours_at_elimination_positions(bijection_model):
    """Bits vs nats and the averaging order cancel in the reduction: the two definitions agree."""
    from bayesmanifold.suite import SuiteConfig, Target, run_suite

    model, task = bijection_model
    res = measure_protocols(model, task, ProtocolConfig(n_seqs=32, seed=7))
    ours = run_suite(Target(model, task), SuiteConfig(n_seqs=32, seed=7, dynamics=False)).to_dict()
    af = res.numbers["attention_focusing"]
    assert af["elimination"]["reduction"] == pytest.approx(ours["attention_entropy_reduction"], abs=1e-9)
    assert np.allclose(np.array(af["elimination"]["entropy_bits_per_layer"]) * np.log(2), ours["attention_entropy"], atol=1e-9)
    assert af["elimination_final"]["n_queries"] == 32  # one query per sequence: the last elimination position


def test_hmm_kl_at_their_K():
    from bayesmanifold.windtunnels.calibration import measure_calibration

    task = HMMTask(K=6)
    spec = preset_spec("tiny", task, n_ctx=task.with_K(8).seq_len)
    model = build_model(spec, seed=0).eval()
    res = measure_protocols(model, task, ProtocolConfig(n_seqs=8, hmm_samples=12, hmm_K=4, seed=2))
    cal = res.numbers["calibration"]
    assert set(cal) == {"K4", "K6"}
    ref = measure_calibration(model, task.with_K(4), n_seqs=12, generator=2)
    assert cal["K4"]["mean_kl_bits"] == pytest.approx(ref.mean_kl_bits, rel=1e-12)
    # the per-(sequence, position) mean equals the mean of per-position means (equal counts)
    assert cal["K4"]["mean_kl_bits"] > 0
    far = measure_protocols(model, task, ProtocolConfig(n_seqs=8, hmm_samples=4, hmm_K=50, seed=2))
    assert "skipped" in far.numbers["calibration"]["K50"]
