"""The fused C kernels against the tiled PyTorch code they stand in for (float32, CPU).

Each accumulator runs the same layer twice, ``kernel="auto"`` (the kernels) and ``kernel="torch"``:
sums are taken in another order, so figures agree to float32 rounding, and verdicts, counts and
maxima of real discrepancies agree. Rounding-level residuals (noise) are only held below their
bound on both paths; planted discrepancies are measured to their size by both.
"""

import ctypes
import math
import os

import numpy as np
import pytest
import torch

from bayesmanifold import kernels
from bayesmanifold.analyses import AdvantageStats, RoutingLawCheck
from bayesmanifold.analyses.attention import row_entropy
from bayesmanifold.analyses.headstats import layer_tiles
from bayesmanifold.errors import InputError
from bayesmanifold.hooks.bundle import LayerBundle
from bayesmanifold.kernels import build

REQUIRED = os.environ.get("BAYESMANIFOLD_REQUIRE_KERNELS") == "1"
STATUS = kernels.status()
needs_kernels = pytest.mark.skipif(not STATUS.available and not REQUIRED,
                                   reason=f"the fused kernels are not built here: {STATUS.reason}")


def test_kernels_are_built_where_required():
    if REQUIRED:
        assert STATUS.available, STATUS.reason
    if STATUS.available:
        assert os.path.isfile(STATUS.path) and STATUS.flags
    else:
        assert STATUS.reason


def _layer(gen, batch=2, heads=6, kv=2, pos=150, d=16, window=None, pad=None, scale=3.0):
    """A float32 layer with autograd's gradients: causal (or sliding-window) mask, left padding
    ``pad[b]`` positions per sequence, GQA ``heads`` over ``kv``."""
    pad = pad or (0,) * batch
    i = torch.arange(pos)
    causal = i[None, :] <= i[:, None]
    if window is not None:
        causal &= i[None, :] > i[:, None] - window
    valid = torch.stack([causal & (i[None, :] >= p) & (i[:, None] >= p) for p in pad])
    query_valid = torch.stack([i >= p for p in pad])
    scores = (torch.randn(batch, heads, pos, pos, generator=gen) * scale)
    scores = scores.masked_fill(~valid[:, None], torch.finfo(torch.float32).min).requires_grad_(True)
    pattern = scores.softmax(-1)
    pattern.retain_grad()
    kv_heads = [h // (heads // kv) for h in range(heads)]
    values = torch.randn(batch, pos, kv, d, generator=gen).requires_grad_(True)
    vq = values[:, :, kv_heads]
    z = torch.einsum("bhqk,bkhd->bqhd", pattern, vq)
    u = torch.randn(z.shape, generator=gen) * query_valid[:, :, None, None]
    (z * u).sum().backward()
    return LayerBundle(
        layer=0, heads=list(range(heads)), kv_heads=kv_heads, attn_scale=None, pattern=pattern.detach(),
        values=vq.detach(), grad_z=u, grad_pattern=pattern.grad, grad_scores=scores.grad, grad_values=values.grad,
        valid=valid, query_valid=query_valid, n_heads=heads, n_kv_heads=kv,
    )


def _copy(b: LayerBundle, **changes) -> LayerBundle:
    fields = {k: getattr(b, k) for k in b.__dataclass_fields__}
    fields.update(changes)
    return LayerBundle(**fields)


def _both(acc_type, b, **kw):
    out = []
    for kernel in ("auto", "torch"):
        acc = acc_type(kernel=kernel, **kw)
        acc.update(_copy(b))
        out.append(acc.finalize())
    return out


LAYERS = {
    "causal": {},
    "window+padding": dict(window=40, pad=(0, 23)),
    "one query block": dict(pos=20, batch=1),
    "mha, long": dict(heads=3, kv=3, pos=400, batch=1),
}


@needs_kernels
@pytest.mark.parametrize("shape", list(LAYERS))
def test_routing_law_check_agrees_with_the_torch_path(gen, shape):
    b = _layer(gen, **LAYERS[shape])
    fused, ref = _both(RoutingLawCheck, b)
    assert fused.holds and ref.holds, (fused.reason, ref.reason)
    for f, r in zip(fused.rows, ref.rows):
        assert f["holds"] == r["holds"] and f["tested"] == r["tested"]
        for k in ("max_abs_dscores", "max_row_scale", "max_abs_residual_dvalues"):
            assert f[k] == pytest.approx(r[k], rel=1e-5, abs=1e-12), k
        # rounding-level residuals are noise: both below a bound far under the tolerance
        for k in ("rel_residual_dscores", "rel_residual_dpattern", "rel_rowsum_dscores"):
            assert f[k] < 1e-5 and r[k] < 1e-5, (k, f[k], r[k])


@needs_kernels
def test_planted_discrepancies_are_measured_alike(gen):
    b = _layer(gen, window=40, pad=(0, 23))
    gs, gp = b.grad_scores.clone(), b.grad_pattern.clone()
    gs[1, 2, 70, 50] += 0.01  # a valid entry of a valid row: the routing law fails there
    gp[0, 4, 90, 60] += 0.02  # a valid entry: the compatibility law fails
    gp[0, 1, 90, 120] += 5.0  # a masked (future) key: ∂L/∂α is not meaningful there, so ignored
    bad = _copy(b, grad_scores=gs, grad_pattern=gp)
    fused, ref = _both(RoutingLawCheck, bad)
    for res in (fused, ref):
        df = res.to_dataframe().set_index("head")
        assert not df.loc[2, "holds"] and df.loc[2, "max_abs_residual_dscores"] == pytest.approx(0.01, rel=1e-3)
        assert not df.loc[4, "holds"] and df.loc[4, "max_abs_residual_dpattern"] == pytest.approx(0.02, rel=1e-3)
        assert df.loc[1, "holds"], df.loc[1, "reason"]


@needs_kernels
@pytest.mark.parametrize("kernel", ["auto", "torch"])
@pytest.mark.parametrize("tensor", ["grad_scores", "grad_pattern", "pattern"])
def test_a_nan_gradient_never_holds(gen, kernel, tensor):
    b = _layer(gen, pos=60)
    t = getattr(b, tensor).clone()
    t[0, 3, 40, 10] = float("nan")
    check = RoutingLawCheck(kernel=kernel)
    check.update(_copy(b, **{tensor: t}))
    res = check.finalize()
    row = res.to_dataframe().set_index("head").loc[3]
    assert not res.holds and not row["holds"]
    assert "non-finite" in row["reason"] or "NaN" in row["reason"] or "nan" in row["reason"], row["reason"]


@needs_kernels
@pytest.mark.parametrize("shape", list(LAYERS))
def test_advantage_stats_agree_with_the_torch_path(gen, shape):
    b = _layer(gen, **LAYERS[shape])
    fused, ref = _both(AdvantageStats, b)
    fd, rd = fused.to_dataframe(), ref.to_dataframe()
    for col in ("n_entries", "n_queries", "n_routing_queries"):
        assert (fd[col] == rd[col]).all(), col
    for col in ("mean_adv", "std_adv", "min_adv", "max_adv", "mass_positive", "alpha_weighted_abs_adv",
                "routing_top1_share", "routing_effective_keys"):
        np.testing.assert_allclose(fd[col], rd[col], rtol=2e-5, atol=1e-6, err_msg=col)
    # counts of A > 0 may differ where A is within rounding of 0 (b̄ summed in another order)
    np.testing.assert_allclose(fd["frac_positive"], rd["frac_positive"], atol=1e-4)
    np.testing.assert_allclose(fd["argmax_positive"], rd["argmax_positive"], atol=2e-3)
    # Σ_j α_ij A_ij = 0 on every row: both are rounding noise of the same size
    assert fd["mean_abs_alpha_weighted_adv"].max() < 1e-5 and rd["mean_abs_alpha_weighted_adv"].max() < 1e-5
    for key, h in fused.histograms.items():
        r = ref.histograms[key]
        assert h.sum() == r.sum() == fd.set_index(["layer", "head"]).loc[key, "n_entries"]
        assert np.abs(h - r).sum() <= max(4, 1e-4 * h.sum())


@needs_kernels
def test_advantage_histogram_off_and_nan_rows(gen):
    b = _layer(gen, pos=60)
    acc = AdvantageStats(histogram=False)
    acc.update(_copy(b))
    assert acc.finalize().histograms == {}
    gs = b.grad_scores.clone()
    gs[1, 2, 30, 5] = float("nan")
    acc = AdvantageStats()
    acc.update(_copy(b, grad_scores=gs))
    df = acc.finalize().to_dataframe().set_index("head")
    assert math.isnan(df.loc[2, "mean_adv"])  # the kernels give a row with a NaN input NaN everywhere
    assert np.isfinite(df.drop(index=2)["mean_adv"]).all()


@needs_kernels
@pytest.mark.parametrize("shape", ["causal", "window+padding"])
def test_row_entropy_agrees_with_the_torch_path(gen, shape):
    b = _layer(gen, **LAYERS[shape])
    tl = layer_tiles(b)
    fused, ref = row_entropy(b.pattern, tl), row_entropy(b.pattern, tl, kernel="torch")
    torch.testing.assert_close(fused, ref, rtol=2e-6, atol=2e-6)
    assert float(fused[0, :, 0].abs().max()) == 0.0  # one key: H = 0 exactly


def test_bad_kernel_choice_is_refused():
    for make in (lambda: RoutingLawCheck(kernel="c"), lambda: AdvantageStats(kernel=None)):
        with pytest.raises(InputError, match="kernel must be one of 'auto', 'torch'"):
            make()
    with pytest.raises(InputError, match="kernel must be one of"):
        row_entropy(torch.ones(1, 1, 1, 1), kernel="fused")


def test_without_a_compiler_the_torch_path_runs(gen, monkeypatch, tmp_path):
    monkeypatch.setattr(build, "_state", {})
    monkeypatch.setattr(build, "_compiler", lambda: None)
    st = kernels.status()
    assert not st.available and "no C compiler" in st.reason
    b = _layer(gen, pos=40)
    assert not kernels.usable(b.pattern)
    check = RoutingLawCheck()
    check.update(_copy(b))
    assert check.finalize().holds


def test_a_compiler_that_fails_is_reported(monkeypatch, tmp_path):
    fake = tmp_path / "cc"
    fake.write_text("#!/bin/sh\necho 'error: this compiler builds nothing' >&2\nexit 1\n")
    fake.chmod(0o755)
    monkeypatch.setattr(build, "_state", {})
    monkeypatch.setattr(build, "_compiler", lambda: [str(fake)])
    monkeypatch.setenv("BAYESMANIFOLD_CACHE", str(tmp_path / "cache"))
    st = kernels.status()
    assert not st.available and "this compiler builds nothing" in st.reason
    assert not list((tmp_path / "cache").rglob("*.so")) and not list((tmp_path / "cache").rglob("*.tmp"))


@needs_kernels
def test_cc_with_a_launcher_is_split(monkeypatch, tmp_path):
    monkeypatch.setenv("CC", f"env LC_ALL=C {build.shutil.which('cc') or build.shutil.which('gcc')}")
    assert build._compiler()[:2] == [build.shutil.which("env"), "LC_ALL=C"]
    monkeypatch.setenv("CC", "'unbalanced")  # unparseable: the next candidate
    assert build._compiler() is not None


@needs_kernels
def test_the_library_is_built_once_and_found_again(monkeypatch, tmp_path):
    monkeypatch.setattr(build, "_state", {})
    monkeypatch.setenv("BAYESMANIFOLD_CACHE", str(tmp_path))
    first = kernels.status()
    assert first.available and first.path.startswith(str(tmp_path))
    mtime = os.path.getmtime(first.path)
    monkeypatch.setattr(build, "_state", {})
    monkeypatch.setattr(build, "_build", lambda *a: pytest.fail("built again"))
    again = kernels.status()
    assert again.path == first.path and os.path.getmtime(again.path) == mtime
    assert isinstance(build.load(), ctypes.CDLL)
