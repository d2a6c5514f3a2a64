"""Paper III as the authors' LLM pipeline measures it, on a tiny GQA model, against oracles."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from bayesmanifold.analyses.paper3 import paper3_protocol, stratified_subset
from bayesmanifold.analyses.paper3_authors import authors_gqa_reshape, authors_value_manifold
from bayesmanifold.backends import model_access, toy_model
from bayesmanifold.errors import InputError

PROMPTS = ["The cat sat on the", "2 + 2 =", "Once upon a time", "def f(x): return", "alpha beta gamma",
           "x y z w v u", "import os", "Dear Sir,"]


@pytest.fixture(scope="module")
def model():
    return toy_model(n_layers=2, n_heads=4, d_model=32, n_ctx=24, n_key_value_heads=2)


def test_authors_variant_against_a_cache_oracle(model):
    res = paper3_protocol(model, PROMPTS, protocol="authors", n_boot=20)
    a = res.authors
    access = model_access(model)
    vals, keys = [], {0: [], 1: []}
    for p in PROMPTS:  # oracle: the final token's hook values, read from TransformerLens's own cache
        _, cache = model.run_with_cache(torch.tensor([list(p.encode())]))
        vals.append(cache[access.hook_name("v", 1)][0, -1].flatten().double())
        for layer in (0, 1):
            k = F.normalize(cache[access.hook_name("k", layer)][0, -1].double(), dim=-1)  # [n_kv, d_head]
            c = (k @ k.T).abs()
            keys[layer].append(float((c.sum() - c.diagonal().sum()) / (c.shape[0] * (c.shape[0] - 1))))
    x = torch.stack(vals).numpy()
    z = (x - x.mean(0)) / np.where(x.std(0) > 0, x.std(0), 1.0)
    ev = np.linalg.eigvalsh(np.cov(z.T))[::-1]
    assert a.value_manifold["pc1"] == pytest.approx(ev[0] / ev.sum(), rel=1e-6)
    assert a.value_manifold["pc12"] == pytest.approx((ev[0] + ev[1]) / ev.sum(), rel=1e-6)
    top = ev[: a.value_manifold["n_components"]]
    assert a.value_manifold["participation_ratio_top"] == pytest.approx(top.sum() ** 2 / (top**2).sum(), rel=1e-6)
    np.testing.assert_allclose(a.key_cos_kv, [np.mean(keys[0]), np.mean(keys[1])], rtol=1e-6)
    # repeat-kv over 4 query heads in groups of 2: 1 of the 3 partners of each head is its twin
    np.testing.assert_allclose(a.key_cos_query_heads, 1 / 3 + 2 / 3 * a.key_cos_kv, rtol=1e-9)
    np.testing.assert_allclose(a.attention_entropy_bits, res.attention_entropy / np.log(2), rtol=1e-12)
    assert a.attention_entropy_reduction == pytest.approx(res.attention_entropy_reduction)
    assert a.layers == [0, 1] and a.n_prompts == len(PROMPTS)
    assert json.loads(json.dumps(res.to_dict()))["authors"]["criteria"] == a.criteria
    assert len(a.to_dataframe()) == 2 and "4 'heads' of width 4" in a.gqa_reshape


def test_authors_value_manifold_bootstrap_is_seeded_and_leaves_global_rngs():
    g = np.random.default_rng(1)
    h = g.normal(size=30)
    x = h[:, None] * g.normal(size=12) + 0.3 * g.normal(size=(30, 12))  # one latent drives every feature
    state = np.random.get_state()[1].copy()
    r1 = authors_value_manifold(x, h, n_boot=50)
    r2 = authors_value_manifold(x, h, n_boot=50)
    assert np.array_equal(state, np.random.get_state()[1])
    assert r1["pc12_ci"] == r2["pc12_ci"] and r1["pc12_ci"][0] <= r1["pc12_ci"][1]
    assert r1["n_components"] == 10 and len(r1["top_eigenvalues"]) == 10
    assert abs(r1["pearson_pc1_entropy"]) > 0.9  # PC1 is the shared latent
    assert "pc12_ci" not in authors_value_manifold(x, h, n_boot=0)


def test_authors_gqa_reshape_on_smollm2_and_llama_shapes():
    assert authors_gqa_reshape(9, 3, 64).startswith("fails") and "192" in authors_gqa_reshape(9, 3, 64)
    assert "32 'heads' of width 16" in authors_gqa_reshape(32, 8, 64)  # Llama-3.2-1B
    assert authors_gqa_reshape(16, 16, 64).startswith("no GQA")


def test_protocol_argument_and_subset_errors(model):
    with pytest.raises(InputError, match="protocol"):
        paper3_protocol(model, PROMPTS, protocol="theirs")
    with pytest.raises(InputError, match="n_boot"):
        paper3_protocol(model, PROMPTS, protocol="authors", n_boot=-1)
    recs = [{"text": str(i), "quintile": i % 5, "domain": "ab"[i % 2]} for i in range(20)]
    sub = stratified_subset(recs, 2, seed=3)
    assert [r["quintile"] for r in sub] == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]
    assert sub == stratified_subset(recs, 2, seed=3)
    with pytest.raises(InputError, match="quintile"):
        stratified_subset(recs, 5)


def test_analyze_cli_authors_on_prompts(hf_llama_dir, tmp_path, capsys):
    from bayesmanifold.cli import main

    f = tmp_path / "p.jsonl"
    f.write_text("".join(json.dumps({"text": t}) + "\n" for t in ["the cat sat", "a b c d e", "hello world.", "one more line", "zz yy xx"]))
    out = tmp_path / "a.json"
    assert main(["analyze", str(hf_llama_dir), "--prompts", str(f), "--protocol", "authors", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "authors' protocol beside ours" in printed and "k/v reshaping" in printed
    res = json.loads(out.read_text())
    assert res["authors"]["n_prompts"] == 5 and len(res["authors"]["key_cos_kv"]) == len(res["key_orthogonality"])


def test_right_padded_batches_equal_one_prompt_at_a_time(model):
    one = paper3_protocol(model, PROMPTS, protocol="authors", n_boot=0, batch_size=1)
    four = paper3_protocol(model, PROMPTS, protocol="authors", n_boot=0, batch_size=3)
    for name in ("pc1", "pc12", "participation_ratio", "attention_entropy"):
        np.testing.assert_allclose(getattr(four, name), getattr(one, name), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(four.authors.key_cos_kv, one.authors.key_cos_kv, rtol=1e-5)
    np.testing.assert_allclose(four.authors.value_manifold["entropy_nats"], one.authors.value_manifold["entropy_nats"], rtol=1e-5)
    with pytest.raises(InputError, match="batch_size"):
        paper3_protocol(model, PROMPTS, batch_size=0)
