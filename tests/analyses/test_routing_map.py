"""The per-token routing map against autograd (TransformerLens run_with_cache as the oracle)."""

import json
import re

import numpy as np
import pytest
import torch
from helpers import hook_count, make_model, needs_hooked_scores_cache

from bayesmanifold.analyses import RoutingMap, RoutingMapAccumulator, routing_map
from bayesmanifold.backends import toy_model
from bayesmanifold.errors import InputError, SelectionError
from bayesmanifold.hooks import capture


def _oracle(model, tokens):
    """α, ∂L/∂α, ∂L/∂s and ∂L/∂z per layer from run_with_cache(incl_bwd=True) (next-token loss)."""
    names = lambda n: n.endswith(("hook_pattern", "hook_attn_scores", "hook_z"))  # noqa: E731
    _, cache = model.run_with_cache(tokens, names_filter=names, incl_bwd=True, return_type="loss")
    out = {}
    for layer in range(model.cfg.n_layers):
        p = f"blocks.{layer}.attn."
        out[layer] = {k: cache[p + n][0].detach() for k, n in
                      (("a", "hook_pattern"), ("gp", "hook_pattern_grad"), ("gs", "hook_attn_scores_grad"), ("u", "hook_z_grad"))}
    return out


@needs_hooked_scores_cache
@pytest.mark.parametrize("overrides", [{}, {"n_key_value_heads": 2}, {"positional_embedding_type": "rotary", "rotary_dim": 8, "attn_only": True}])
def test_alpha_advantage_force_match_autograd(gen, overrides):
    model = make_model(torch.float64, seed=3, **overrides)
    tokens = torch.randint(0, 50, (1, 20), generator=gen)
    m = routing_map(model, tokens, precision="float64")
    ref = _oracle(model, tokens)
    valid = torch.tril(torch.ones(20, 20, dtype=torch.bool))
    for k, (layer, head) in enumerate(m.heads):
        r = ref[layer]
        a, gp, gs = r["a"][head], r["gp"][head], r["gs"][head]
        gp = gp.masked_fill(~valid, 0.0)
        adv_ref = (a * gp).sum(-1, keepdim=True) - gp
        np.testing.assert_allclose(m.pattern[k], a.numpy(), rtol=0, atol=1e-10)
        np.testing.assert_allclose(m.advantage[k][valid.numpy()], adv_ref[valid].numpy(), rtol=0, atol=1e-10)
        # the force is autograd's own score gradient, negated
        np.testing.assert_allclose(m.force[k][valid.numpy()], -gs[valid].numpy(), rtol=0, atol=1e-10)
        assert np.isnan(m.force[k][~valid.numpy()]).all() and np.isnan(m.advantage[k][~valid.numpy()]).all()
        assert m.law_residual[k] < 1e-10
    assert hook_count(model) == 0


@needs_hooked_scores_cache
def test_push_and_value_update_against_slow_loop(gen):
    model = make_model(torch.float64, seed=5, n_key_value_heads=2)
    tokens = torch.randint(0, 50, (1, 12), generator=gen)
    m = routing_map(model, tokens, heads="0.1,1.0,1.3", precision="float64")
    assert m.heads == [(0, 1), (1, 0), (1, 3)]
    ref = _oracle(model, tokens)
    n = tokens.shape[1]
    for k, (layer, head) in enumerate(m.heads):
        a, gp, u = ref[layer]["a"][head], ref[layer]["gp"][head], ref[layer]["u"][:, head]
        for j in range(n):
            push, dv = 0.0, torch.zeros(u.shape[-1], dtype=torch.float64)
            for i in range(j, n):
                bbar = sum(float(a[i, jj] * gp[i, jj]) for jj in range(i + 1))
                push += float(a[i, j]) * (bbar - float(gp[i, j]))
                dv += a[i, j] * u[i]
            assert m.push[k, j] == pytest.approx(push, abs=1e-12)
            assert m.value_update[k, j] == pytest.approx(float(dv.norm()), abs=1e-12)
        assert abs(m.push[k].sum()) < 1e-12  # every query's forces sum to zero


def test_value_update_is_value_gradient_for_one_head_groups(gen):
    model = make_model(torch.float64, seed=1)
    tokens = torch.randint(0, 50, (1, 10), generator=gen)
    _, cache = model.run_with_cache(tokens, names_filter=lambda n: n.endswith("hook_v"), incl_bwd=True, return_type="loss")
    m = routing_map(model, tokens, precision="float64")
    for k, (layer, head) in enumerate(m.heads):
        gv = cache[f"blocks.{layer}.attn.hook_v_grad"][0, :, head].norm(dim=-1)
        np.testing.assert_allclose(m.value_update[k], gv.numpy(), rtol=1e-10, atol=1e-14)


def test_toy_reads_utf8_bytes_and_results_are_json_safe():
    model = toy_model(dtype="float64")
    text = "def f(x):\n    return f(x) + é"
    m = routing_map(model, text, heads=[(1, 2), (0, 0)])
    assert m.token_ids == list(text.encode("utf-8"))
    assert m.tokens[:3] == ["d", "e", "f"] and m.tokens[9] == "\\n" and m.tokens[-1] == "\\xa9"
    assert m.heads == [(0, 0), (1, 2)] and m.prompt == text and m.objective == "next-token"
    assert m.pattern.dtype == np.float32 and m.force.dtype == np.float32  # the default precision
    d = m.to_dict()
    s = json.dumps(d, allow_nan=False)
    assert set(d) >= {"prompt", "token_ids", "tokens", "heads", "n_layers", "n_heads", "kept"}
    assert d["kept"] == ["0.0", "1.2"] and d["n_layers"] == 2 and d["n_heads"] == 4
    h = d["heads"][1]
    assert {"layer", "head", "total_abs_force", "induction", "previous_token", "push", "value_update", "compat_mean"} <= set(h)
    assert "pattern" not in h and len(h["push"]) == len(text.encode()) and "NaN" not in s
    assert np.isnan(m.force[1][0, 1]) and np.isfinite(m.force[1][1, 0])
    df = m.to_dataframe()
    n = len(m.token_ids)
    assert len(df) == 2 * n * (n + 1) // 2
    np.testing.assert_allclose(df["force"], df["alpha"] * df["advantage"], rtol=1e-5, atol=1e-9)
    sf = m.summary_frame()
    assert list(sf.columns[:5]) == ["layer", "head", "total_abs_force", "mass_positive", "entropy"]
    assert ((sf.mass_positive >= 0) & (sf.mass_positive <= 1)).all()


def test_objectives_and_accumulator_merge(gen):
    model = make_model(torch.float64, seed=2)
    tokens = torch.randint(0, 50, (1, 9), generator=gen)
    last = routing_map(model, tokens, objective="last", precision="float64")
    pos = routing_map(model, tokens, objective="pos:7", precision="float64")
    np.testing.assert_allclose(last.force, pos.force, equal_nan=True)
    a, b = RoutingMapAccumulator(precision="float64"), RoutingMapAccumulator(precision="float64")
    with capture(model, accumulators=[a], layers=[0]) as cap:
        cap.run(tokens)
    with capture(model, accumulators=[b], layers=[1]) as cap:
        cap.run(tokens)
    merged = a.merge(b).finalize()
    full = routing_map(model, tokens, precision="float64")
    assert isinstance(merged, RoutingMap) and merged.heads == full.heads
    np.testing.assert_allclose(merged.force, full.force, equal_nan=True)


def _forward_counter(model):
    calls = []
    handle = model.hook_dict["hook_embed"].register_forward_hook(lambda *a: calls.append(1))
    return calls, handle


@pytest.mark.parametrize(
    "kwargs, err, match",
    [
        (dict(prompt=""), InputError, "empty"),
        (dict(prompt="x" * 200), InputError, "n_ctx=128"),
        (dict(prompt="abc", heads="2.0"), SelectionError, "layer 2 is out of range"),
        (dict(prompt="abc", heads="1.4"), SelectionError, "head 4 is out of range"),
        (dict(prompt="abc", heads="1-2"), SelectionError, "LAYER.HEAD"),
        (dict(prompt="abc", objective="pos:9"), InputError, "positions"),
        (dict(prompt="abc", objective="bogus"), InputError, "unknown objective"),
        (dict(prompt="a"), InputError, "at least 2"),
        (dict(prompt="abc", top=0), InputError, "top must be a positive integer"),
        (dict(prompt="abc", top=-3), InputError, "top must be a positive integer"),
        (dict(prompt="abc", top=2.5), InputError, "top must be a positive integer"),
        (dict(prompt="abc", top=True), InputError, "top must be a positive integer"),
        (dict(prompt="abc", by="bogus"), InputError, "unknown summary"),
        (dict(prompt="abc", precision="float16"), InputError, "precision"),
    ],
)
def test_bad_input_fails_before_any_work(kwargs, err, match):
    model = toy_model()
    calls, handle = _forward_counter(model)
    try:
        with pytest.raises(err, match=match):
            routing_map(model, **kwargs)
    finally:
        handle.remove()
    assert calls == [] and hook_count(model) == 0


def test_plot_and_html_have_no_external_urls():
    import matplotlib

    matplotlib.use("Agg")
    m = routing_map(toy_model(), "for i in range(3): print(i)")
    ax = m.plot()
    assert ax.get_title().startswith("L")
    m.plot(layer=0, head=1, what="pattern")
    with pytest.raises(SelectionError):
        m.plot(layer=5, head=0)
    page = m.to_html(title="toy map")
    assert page.startswith("<!DOCTYPE html>") and "Sign convention" in page
    assert not re.search(r"https?://|//cdn|\bsrc\s*=|<link\b|@import", page, re.I)
    assert 'id="data"' in page and "</script" not in page.split('id="data">')[1].split("</script>")[0]


def test_top_keeps_the_strongest_heads_and_streams(gen):
    """``top`` keeps the K heads with the largest summary, the same matrices as the full map; the
    accumulator never holds more than K heads' matrices (heads fall out as layers arrive)."""
    model = make_model(torch.float64, seed=4)
    tokens = torch.randint(0, 50, (1, 16), generator=gen)
    full = routing_map(model, tokens, precision="float64")
    ranked = sorted(full.summaries, key=lambda r: -r["total_abs_force"])
    want = sorted((r["layer"], r["head"]) for r in ranked[:3])
    held = []

    class Watched(RoutingMapAccumulator):
        def update(self, b):
            super().update(b)
            held.append(len(self.mats))

    acc = Watched(top=3, precision="float64")
    with capture(model, accumulators=[acc]) as cap:
        cap.run(tokens)
    top = acc.finalize()
    assert top.heads == want and max(held) <= 3 and len(held) == model.cfg.n_layers
    assert len(top.summaries) == len(full.summaries) and sum(r["kept"] for r in top.summaries) == 3
    for k, h in enumerate(top.heads):
        np.testing.assert_array_equal(top.force[k], full.force[full.index(*h)])
    by_ind = routing_map(model, tokens, top=2, by="previous_token")
    best = sorted(full.summaries, key=lambda r: -r["previous_token"])[:2]
    assert by_ind.heads == sorted((r["layer"], r["head"]) for r in best)
    with pytest.raises(SelectionError, match="has no matrices"):
        top.index(*next(h for h in full.heads if h not in want))


def test_induction_and_previous_token_summaries_against_a_loop(gen):
    from bayesmanifold.analyses.induction import induction_targets

    model = make_model(torch.float64, seed=6)
    half = torch.randint(0, 50, (1, 9), generator=gen)
    tokens = torch.cat([half, half], dim=1)
    m = routing_map(model, tokens, precision="float64")
    tgt = induction_targets(tokens, min_match=2)[0]
    q = [i for i in range(tokens.shape[1]) if tgt[i] >= 0]
    assert len(q) >= 7
    for r in m.summaries:
        a = m.pattern[m.index(r["layer"], r["head"])]
        assert r["induction"] == pytest.approx(np.mean([a[i, tgt[i]] for i in q]), abs=1e-12)
        assert r["previous_token"] == pytest.approx(np.mean([a[i, i - 1] for i in range(1, len(a))]), abs=1e-12)
    # no repeated bigram: no induction target, the summary is None in the JSON
    plain = routing_map(model, torch.arange(12)[None])
    assert all(np.isnan(r["induction"]) for r in plain.summaries)
    assert all(r["induction"] is None for r in plain.to_dict()["heads"])


def test_npz_holds_the_matrices_in_float16(gen, tmp_path):
    from bayesmanifold.analyses.routing_maps import load_npz_matrices

    model = make_model(torch.float64, seed=7, n_key_value_heads=2)
    tokens = torch.randint(0, 50, (1, 24), generator=gen)
    m = routing_map(model, tokens, top=5)
    m.save_npz(tmp_path / "m.npz")
    with np.load(tmp_path / "m.npz") as z:
        assert z["pattern"].dtype == np.float16 and z["advantage"].dtype == np.float16
        assert "force" not in z.files and z["heads"].tolist() == [list(h) for h in m.heads]
    z = load_npz_matrices(tmp_path / "m.npz")
    valid = np.isfinite(m.force)
    assert (np.isfinite(z["force"]) == valid).all()
    np.testing.assert_allclose(z["pattern"], m.pattern, rtol=1e-3, atol=1e-7)
    for k in range(len(m.heads)):
        fmax, amax = np.nanmax(np.abs(m.force[k])), np.nanmax(np.abs(m.advantage[k]))
        np.testing.assert_allclose(z["advantage"][k][valid[k]], m.advantage[k][valid[k]], rtol=1e-3, atol=1e-4 * amax)
        np.testing.assert_allclose(z["force"][k][valid[k]], m.force[k][valid[k]], rtol=2e-3, atol=1e-4 * fmax)
    assert not list(tmp_path.glob(".*tmp"))  # written under a temporary name, then renamed


def test_a_map_too_large_for_memory_is_refused_before_the_pass(monkeypatch):
    from bayesmanifold.analyses import routing_maps

    model = toy_model()
    monkeypatch.setattr(routing_maps, "MAX_MATRIX_BYTES", 3 * 4 * 20 * 20 * 3)  # three heads of 20 tokens
    calls, handle = _forward_counter(model)
    try:
        with pytest.raises(InputError, match=r"top=K \(--top K\), K <= 3"):
            routing_map(model, "x" * 20)
        assert calls == []
        assert len(routing_map(model, "x" * 20, top=3).heads) == 3
    finally:
        handle.remove()
