"""Paper III's in-context Bayesian updating test (SULA) on tiny models: the analytic posterior
against brute force, the config, the prompts, whole-word scoring against a plain forward pass,
the result value, determinism and side effects, and the command line's errors."""

import itertools
import json
import math

import numpy as np
import pytest
import torch
from helpers import hook_count

from bayesmanifold.analyses.manifold import RankLimitedWarning
from bayesmanifold.analyses.sula import (
    SulaConfig,
    _label_ids,
    analytic_posterior,
    binary_entropy_bits,
    sula_prompts,
    sula_test,
)
from bayesmanifold.backends import model_access, toy_model
from bayesmanifold.cli import main
from bayesmanifold.errors import ConfigError, InputError

SMALL = {"ks": (0, 1, 3), "n_per_k": 4}


@pytest.fixture(scope="module")
def model():
    return toy_model(n_layers=2, n_heads=4, d_model=32, n_ctx=128, n_key_value_heads=2)


# ------------------------------------------------------------------------- the analytic posterior
def test_analytic_posterior_exact_values():
    p = analytic_posterior([0, 1, 2, 0, 3, 4], [0, 0, 0, 2, 1, 4], 0.1)
    np.testing.assert_allclose(p, [0.5, 0.9, 81 / 82, 1 / 82, 81 / 82, 0.5], rtol=1e-14)
    np.testing.assert_allclose(analytic_posterior(2, 1, 0.2), 0.8, rtol=1e-14)
    h = binary_entropy_bits([0.5, 0.9, 81 / 82, 0.0, 1.0])
    h2 = -(81 / 82 * math.log2(81 / 82) + 1 / 82 * math.log2(1 / 82))
    np.testing.assert_allclose(h, [1.0, 0.4689955935892812, h2, 0.0, 0.0], rtol=1e-12, atol=1e-15)
    assert h2 == pytest.approx(0.09502, abs=1e-5)
    assert analytic_posterior(400, 0, 0.1) == 1.0 and np.isfinite(analytic_posterior(0, 400, 0.1))


@pytest.mark.parametrize("noise", [0.1, 0.3])
def test_analytic_posterior_against_brute_force_bayes(noise):
    """Enumerate every label sequence of length ≤ 5: Bayes' rule by products equals the closed form."""
    for k in range(6):
        for seq in itertools.product((0, 1), repeat=k):
            like = [math.prod((1 - noise) if s == y else noise for s in seq) for y in (0, 1)]
            n_a = seq.count(0)
            assert analytic_posterior(n_a, k - n_a, noise) == pytest.approx(like[0] / sum(like), rel=1e-12)


# ----------------------------------------------------------------------------------- the config
@pytest.mark.parametrize("kw, match", [
    ({"ks": (0, -1)}, "ks must be integers >= 0"),
    ({"ks": ()}, "non-empty"),
    ({"ks": (1, 1)}, "repeat"),
    ({"n_per_k": 1}, "n_per_k must be an integer >= 2"),
    ({"noise": 0.0}, "noise must lie in"),
    ({"noise": 0.5}, "noise must lie in"),
    ({"labels": ("dax",)}, "at least 2 label words"),
    ({"labels": ("dax", "dax")}, "repeat"),
    ({"labels": ("dax", "two words")}, "is not a word"),
    ({"labels": ("dax", "")}, "is not a word"),
    ({"labels": ("blick", "lug")}, "remap_labels must be"),
    ({"ks": (0, 60)}, "needs at least 61 distinct carrier words"),
    ({"ks": (0, 1), "words": ("apple", "dax", "pear")}, "overlap"),
    ({"seed": -1}, "seed must be"),
    ({"batch_tokens": 0}, "batch_tokens"),
])
def test_config_validation(kw, match):
    with pytest.raises(ConfigError, match=match):
        SulaConfig(**kw)


def test_config_round_trip_and_quick():
    cfg = SulaConfig(ks=(0, 2), n_per_k=3, controls=True, seed=7)
    assert SulaConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    assert SulaConfig.quick().n_per_k == 10 and not SulaConfig.quick().controls
    with pytest.raises(ConfigError, match="unknown SulaConfig fields"):
        SulaConfig.from_dict({"n_prompts": 3})
    with pytest.raises(ConfigError, match="must be a SulaConfig"):
        sula_test(toy_model(n_layers=1, n_heads=2, d_model=8), {"n_per_k": 3})


# ---------------------------------------------------------------------------------- the prompts
def test_prompts_follow_the_generative_model():
    cfg = SulaConfig(ks=(0, 2, 8), n_per_k=300, controls=True, seed=3)
    sets = sula_prompts(cfg)
    main_, shuf, remap = sets["main"], sets["shuffled"], sets["lexical_remap"]
    assert [len(s.texts) for s in sets.values()] == [900] * 3
    np.testing.assert_array_equal(main_.n_a + main_.n_b, main_.k)
    assert main_.texts[0].count(":") == 1 and main_.texts[-1].count(":") == 9
    for i in (0, 450, 899):  # carriers and the query are distinct words within a prompt
        words = [part.split(":")[0].strip(" .,") for part in main_.texts[i].split(", ")]
        words = [w.split(". ")[-1] for w in words] + [main_.texts[i].split(" ")[-1].rstrip(":")]
        assert len(set(words[-(main_.k[i] + 1):])) == main_.k[i] + 1
    # each shown label equals the latent one with probability 1 − ε: 2400 labels at k = 8
    at8 = main_.k == 8
    agree = np.where(main_.latent[at8] == 0, main_.n_a[at8], main_.n_b[at8]).sum() / (8 * at8.sum())
    assert abs(agree - 0.9) < 0.02
    # shuffled: the same carriers, pairs and latents; labels independent of the latent (agreement ≈ 1/2)
    np.testing.assert_array_equal(shuf.pair, main_.pair)
    np.testing.assert_array_equal(shuf.latent, main_.latent)
    agree_s = np.where(shuf.latent[at8] == 0, shuf.n_a[at8], shuf.n_b[at8]).sum() / (8 * at8.sum())
    assert abs(agree_s - 0.5) < 0.04
    # lexical remap: the main prompts with every label word mapped
    mapping = dict(zip(cfg.labels, cfg.remap_labels))
    for t_main, t_remap in zip(main_.texts[::37], remap.texts[::37]):
        assert " ".join(mapping.get(w.rstrip(",."), w.rstrip(",.")) for w in t_main.split()) == \
               " ".join(w.rstrip(",.") for w in t_remap.split())
    again = sula_prompts(cfg)["main"]
    assert again.texts == main_.texts  # deterministic in the seed
    assert sula_prompts(SulaConfig(ks=(0, 2, 8), n_per_k=300, seed=4))["main"].texts != main_.texts


# ------------------------------------------------------------------------------ the measurement
def test_sula_on_a_toy_model(model):
    torch_state, np_state = torch.random.get_rng_state(), np.random.get_state()
    before = hook_count(model)
    with pytest.warns(RankLimitedWarning, match="12 prompts per condition for 16 value features"):
        res = sula_test(model, SulaConfig(**SMALL, controls=True))
    assert hook_count(model) == before
    assert torch.equal(torch.random.get_rng_state(), torch_state)
    assert np.array_equal(np.random.get_state()[1], np_state[1])
    assert set(res.conditions) == {"main", "shuffled", "lexical_remap"}
    m = res.main
    assert len(m.texts) == 12 and res.layer == 1 and res.n_features == 16  # 2 kv heads × d_head 8
    assert np.all((m.model_p_a >= 0) & (m.model_p_a <= 1)) and np.all(m.logp_a < 0) and np.all(m.logp_b < 0)
    np.testing.assert_allclose(m.model_p_a, 1 / (1 + np.exp(m.logp_b - m.logp_a)), rtol=1e-12)
    np.testing.assert_allclose(res.conditions["shuffled"].analytic_entropy, 1.0)
    s = res.summary()
    assert set(s["entropy_mae_by_k"]) == {0, 1, 3}
    assert s["entropy_mae_bits"] == pytest.approx(np.mean(np.abs(m.model_entropy - m.analytic_entropy)))
    # references by hand: 4 prompts at each k of 0, 1, 3; H = 1 at k = 0, 0.469 at k = 1, 0.469 or 0.0015 at k = 3
    h3 = binary_entropy_bits(analytic_posterior(m.n_a[m.k == 3], m.n_b[m.k == 3]))
    assert s["mae_if_always_certain_bits"] == pytest.approx((4 + 4 * 0.4689955935892812 + h3.sum()) / 12)
    assert s["mae_if_always_uniform_bits"] == pytest.approx(1 - s["mae_if_always_certain_bits"])
    assert s["analytic_entropy_by_k"][0] == 1.0 and s["analytic_entropy_by_k"][1] == pytest.approx(0.4689955935892812)
    assert s["rho_pc1_analytic_entropy"] is None or s["rho_pc1_analytic_entropy"] >= 0  # PC1 oriented
    assert set(s["controls"]) == {"shuffled", "lexical_remap"}
    from bayesmanifold.analyses.stats import spearman

    assert s["abs_rho_k_analytic_entropy"] == pytest.approx(abs(spearman(m.k, m.analytic_entropy)))
    assert s["rho_pc1_evidence_entropy_within_k"][0] is None  # one entropy (1 bit) at k = 0
    at3 = m.k == 3
    assert s["rho_pc1_evidence_entropy_within_k"][3] == pytest.approx(spearman(m.pc1[at3], m.evidence_entropy[at3]))
    assert s["label_tokens"]["zorb"] == 5  # bytes of " zorb": scored as a whole word
    assert s["paper3"]["entropy_mae_bits"]["Phi-2"] == 0.31
    d = json.loads(json.dumps(res.to_dict()))
    assert len(d["prompts"]) == 36 and d["config"]["n_per_k"] == 4
    df = res.to_dataframe()
    assert len(df) == 36 and {"condition", "k", "model_entropy", "analytic_entropy", "pc1", "shared_pc1"} <= set(df.columns)
    import matplotlib.pyplot as plt

    axes = res.plot()
    assert len(axes) == 3
    plt.close(axes[0].figure)
    with pytest.warns(RankLimitedWarning):
        again = sula_test(model, SulaConfig(**SMALL, controls=True))
    np.testing.assert_array_equal(again.main.logp_a, m.logp_a)  # deterministic under the seed
    np.testing.assert_array_equal(again.shared_pc1["shuffled"], res.shared_pc1["shuffled"])


def _alone(model, text, label):
    """log P(" label" | text) by a plain forward pass of that one sequence."""
    access = model_access(model)
    ids, full = access.encode(text), access.encode(f"{text} {label}")
    with torch.no_grad():
        lp = model(full[None].to(access.device)).double().log_softmax(-1)[0]
    return sum(float(lp[p - 1, full[p]]) for p in range(len(ids), len(full)))


@pytest.mark.filterwarnings("ignore::bayesmanifold.analyses.manifold.RankLimitedWarning")
@pytest.mark.parametrize("which", ["toy", "llama"])
def test_whole_word_scores_equal_a_plain_forward_pass(model, hf_llama_dir, which):
    """Batched, right-padded scoring through capture equals one sequence scored alone."""
    if which == "llama":
        from bayesmanifold.backends import load_model

        model = load_model(str(hf_llama_dir))  # GQA, rotary, a (character) tokenizer
    res = sula_test(model, SulaConfig(ks=(0, 1, 2), n_per_k=3, batch_tokens=200))
    m = res.main
    for i in range(len(m.texts)):
        assert m.logp_a[i] == pytest.approx(_alone(model, m.texts[i], m.label_a[i]), abs=1e-4)
        assert m.logp_b[i] == pytest.approx(_alone(model, m.texts[i], m.label_b[i]), abs=1e-4)


def test_errors_before_work(model):
    no_text = toy_model(n_layers=1, n_heads=2, d_model=8, d_vocab=64)
    with pytest.raises(InputError, match="no tokenizer"):
        sula_test(no_text, SulaConfig(**SMALL))
    short = toy_model(n_layers=1, n_heads=2, d_model=8, n_ctx=32)
    with pytest.raises(InputError, match="n_ctx=32"):
        sula_test(short, SulaConfig(ks=(0, 4), n_per_k=2))

    class NoTokens:
        def encode(self, text):
            return torch.tensor([1, 2])

    with pytest.raises(InputError, match="zero tokens"):
        _label_ids(NoTokens(), "dax")


# ---------------------------------------------------------------------------- the command line
def _one_line(capsys, argv, contains):
    assert main(argv) == 2, argv
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err and contains in err, err


@pytest.mark.parametrize("argv, contains", [
    (["sula", "toy", "--k", "0,-1"], "must be >= 0"),
    (["sula", "toy", "--k", "1,x"], "comma-separated integers"),
    (["sula", "toy", "--n-per-k", "1"], "--n-per-k"),
    (["sula", "toy", "--labels", "dax"], "at least 2"),
    (["sula", "toy", "--labels", "dax,two words"], "is not a word"),
    (["sula", "toy", "--noise", "0.7"], "noise must lie in"),
    (["sula", "toy", "--plot", "fig.txt"], "written as png, pdf, svg"),
    (["sula", "bijection-v20", "--n-per-k", "2"], "no tokenizer"),
])
def test_cli_errors(capsys, argv, contains):
    _one_line(capsys, argv, contains)


@pytest.mark.filterwarnings("ignore::bayesmanifold.analyses.manifold.RankLimitedWarning")
def test_cli_runs_and_writes(tmp_path, capsys):
    j, p = tmp_path / "s.json", tmp_path / "s.png"
    assert main(["sula", "toy", "--k", "0,1,2", "--n-per-k", "3", "--controls", "--json", str(j), "--plot", str(p)]) == 0
    out = capsys.readouterr().out
    assert "entropy MAE" in out and "control shuffled" in out and "control lexical_remap" in out
    d = json.loads(j.read_text())
    assert d["model"] == "toy" and len(d["prompts"]) == 27 and p.stat().st_size > 1000
