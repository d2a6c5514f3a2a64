"""Paper II's EM-like vs SGD experiment: exact gradients, the M-step solve, ordering, JSON, errors."""

import json
import math

import pytest
import torch

from bayesmanifold.cli import main
from bayesmanifold.errors import ConfigError, TaskError
from bayesmanifold.experiments.em_vs_sgd import (
    EMvsSGDConfig,
    attention_forward_backward,
    init_weights,
    m_step_values,
    run_em_vs_sgd,
    seeds_for,
)


@pytest.fixture(autouse=True)
def one_thread():
    """One torch thread: on a small shared machine OpenMP threads mostly wait for each other."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _autograd_reference(X, y, WQ, WK, WV, WO):
    """Dense single head with autograd: per-row mean CE, grads, α and u = ∂L/∂z."""
    Ws = [w.clone().requires_grad_(True) for w in (WQ, WK, WV, WO)]
    T = X.shape[1]
    S = (X @ Ws[0]) @ (X @ Ws[1]).transpose(1, 2) / math.sqrt(WQ.shape[-1])
    S = S.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
    A = torch.softmax(S, -1)
    A.retain_grad()
    Z = A @ (X @ Ws[2])
    Z.retain_grad()
    logits = Z @ Ws[3]
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="none").view(y.shape).mean(1)
    loss.sum().backward()
    return loss.detach(), [w.grad for w in Ws], A.detach(), Z.grad


def _tiny(B=3, T=23, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(B, T, 20, generator=g, dtype=dtype)
    y = torch.randint(8, (B, T), generator=g)
    W = [torch.randn(B, *s, generator=g, dtype=dtype) * 0.4 for s in ((20, 10), (20, 10), (20, 15), (15, 8))]
    return X, y, W


@pytest.mark.parametrize("tile", [1, 5, 23, 64])
def test_tiled_pass_matches_autograd(tile):
    X, y, W = _tiny()
    o = attention_forward_backward(X, y, *W, tile=tile, responsibility_rows=torch.tensor([0, 2]))
    loss, grads, A, U = _autograd_reference(X, y, *W)
    assert torch.allclose(o.loss, loss, atol=1e-12)
    for g, r in zip(o.grads, grads):
        assert torch.allclose(g, r, atol=1e-12, rtol=1e-9)
    # responsibility-weighted sums for the M-step rows: Σ_i α_ij u_i and Σ_i α_ij
    idx = torch.tensor([0, 2])
    assert torch.allclose(o.resp_u, A[idx].transpose(1, 2) @ U[idx], atol=1e-12)
    assert torch.allclose(o.resp_mass, A[idx].sum(1), atol=1e-12)
    assert torch.all((o.accuracy >= 0) & (o.accuracy <= 1))


@pytest.mark.parametrize("weight_scale", [0.4, 3.0])
def test_both_exponential_paths_match_autograd(weight_scale):
    """Scores within ±EXP2_BOUND (base 2) are exponentiated as they are; larger ones (weights ×3
    here, bounds in the hundreds) get the row maxima subtracted first; both give exact gradients."""
    from bayesmanifold.experiments.em_vs_sgd.kernel import EXP2_BOUND, LOG2E

    X, y, W = _tiny(seed=1)
    W = [w * (weight_scale / 0.4) for w in W]
    q = (X @ W[0]).norm(dim=-1).amax(-1) * LOG2E / math.sqrt(10)
    bound = float((q * (X @ W[1]).norm(dim=-1).amax(-1)).max())
    assert (bound > EXP2_BOUND) is (weight_scale > 1)
    o = attention_forward_backward(X, y, *W, tile=7)
    loss, grads, _, _ = _autograd_reference(X, y, *W)
    assert torch.isfinite(o.loss).all() and torch.allclose(o.loss, loss, atol=1e-12)
    for g, r in zip(o.grads, grads):
        assert torch.allclose(g, r, atol=1e-12, rtol=1e-9)


def test_m_step_least_squares_solve():
    g = torch.Generator().manual_seed(3)
    X = torch.randn(2, 40, 20, generator=g, dtype=torch.float64)
    WV = torch.randn(2, 20, 15, generator=g, dtype=torch.float64)
    resp_u = torch.randn(2, 40, 15, generator=g, dtype=torch.float64) / 40
    mass = torch.rand(2, 40, generator=g, dtype=torch.float64) + 0.5
    step = 0.7
    new = m_step_values(X, WV, resp_u, mass, step)
    # oracle: normal equations on the explicit targets
    target = X @ WV - step * 40 * resp_u / mass[..., None]
    oracle = torch.linalg.solve(X.transpose(1, 2) @ X, X.transpose(1, 2) @ target)
    assert torch.allclose(new, oracle, atol=1e-10)
    # the residual is orthogonal to the column space of X (least-squares optimality)
    assert (X.transpose(1, 2) @ (X @ new - target)).abs().max() < 1e-9
    # targets that X can represent are met exactly
    D = torch.randn(2, 20, 15, generator=g, dtype=torch.float64)
    exact = m_step_values(X, WV, X @ D * mass[..., None] / 40, mass, 1.0)
    assert torch.allclose(exact, WV - D, atol=1e-10)
    pinv = torch.linalg.pinv(X)
    assert torch.allclose(m_step_values(X, WV, resp_u, mass, step, pinv=pinv), oracle, atol=1e-10)


def test_init_matches_released_stream():
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(2024)
        ref = [torch.randn(20, 10) * 0.1, torch.randn(20, 10) * 0.1, torch.randn(20, 15) * 0.1, torch.randn(15, 8) * 0.1]
    for a, b in zip(init_weights(2024), ref):
        assert torch.equal(a, b)


def test_em_like_beats_sgd_at_200_steps():
    res = run_em_vs_sgd(EMvsSGDConfig(seeds=(42, 2024), steps=200, controls=False))
    assert (res.em_like.final_loss < res.sgd.final_loss).all()
    assert res.speedup > 1
    assert res.h_min_nats == pytest.approx(1.8292, abs=5e-5)
    # curves start at the shared init: identical first losses
    assert res.em_like.curves[:, 0] == pytest.approx(res.sgd.curves[:, 0])
    df = res.to_dataframe()
    assert set(df.method) == {"sgd", "em_like"} and len(df) == 4


def test_cli_json_has_every_field(tmp_path, capsys):
    out = tmp_path / "out.json"
    rc = main(["reproduce", "em-vs-sgd", "--seeds", "2", "--steps", "12", "--no-probes", "--no-progress",
               "--out", str(tmp_path / "figs"), "--json", str(out)])
    assert rc == 0
    assert "[reproduce]" not in capsys.readouterr().err  # --no-progress: no progress lines
    d = json.loads(out.read_text())
    for k in ("h_min_nats", "h_min_bits", "sgd", "em_like", "steps_to_sgd_final_mean", "speedup", "p_value", "controls"):
        assert k in d, k
    fields = ("final_loss_mean", "final_loss_std", "entropy_mean", "accuracy_mean")
    for m in (d["sgd"], d["em_like"], *d["controls"].values()):
        for f in fields:
            assert isinstance(m[f], float), f
    assert set(d["controls"]) == {"sgd_lr0.1", "adam", "m_step", "sgd_s0.3", "em_like_s0.3"}
    for c in d["controls"].values():
        assert "steps_to_sgd_final_mean" in c
    assert d["adam_lr"] in (0.0001, 0.0003, 0.001, 0.003, 0.01, 0.03)
    assert d["h_min_bits"] == pytest.approx(2.639, abs=5e-4)
    assert (tmp_path / "figs" / "loss_curves.png").stat().st_size > 0


@pytest.mark.parametrize(
    "kwargs, err",
    [
        ({"steps": 0}, ConfigError),
        ({"steps": -5}, ConfigError),
        ({"lr": 0.0}, ConfigError),
        ({"value_lr": -0.1}, ConfigError),
        ({"uniform_lr": float("inf")}, ConfigError),
        ({"seeds": ()}, ConfigError),
        ({"seeds": (1, 1)}, ConfigError),
        ({"stickiness": 1.0}, TaskError),
        ({"stickiness": -0.01}, TaskError),
        ({"adam_lrs": ()}, ConfigError),
    ],
)
def test_bad_config(kwargs, err):
    with pytest.raises(err):
        EMvsSGDConfig(**kwargs)


def test_config_round_trip_and_seeds():
    cfg = EMvsSGDConfig(seeds=(1, 2), steps=3)
    assert EMvsSGDConfig.from_dict(cfg.to_dict()) == cfg
    # configs written before the worker processes name the field threads
    old = {k: v for k, v in cfg.to_dict().items() if k != "workers"}
    assert EMvsSGDConfig.from_dict({**old, "threads": 2}).workers == 2
    with pytest.raises(ConfigError, match="not both"):
        EMvsSGDConfig.from_dict({**cfg.to_dict(), "workers": 2, "threads": 2})
    with pytest.raises(ConfigError, match="workers"):
        EMvsSGDConfig(workers=0)
    assert seeds_for(3) == (42, 2024, 1337)
    assert seeds_for(7)[:5] == (42, 2024, 1337, 7777, 9999) and len(set(seeds_for(7))) == 7
    with pytest.raises(ConfigError):
        seeds_for(0)


@pytest.mark.parametrize(
    "argv",
    [["--seeds", "0"], ["--steps", "0"], ["--lr", "-1"], ["--value-lr", "0"], ["--stickiness", "1.2"]],
)
def test_cli_bad_input_is_one_line_error(argv, tmp_path, capsys):
    rc = main(["reproduce", "em-vs-sgd", *argv, "--out", str(tmp_path)])
    assert rc == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "error" in err[0]


def test_recorded_run_ships_with_the_package():
    """The recorded full run is package data (importlib.resources) and holds the headline numbers."""
    from importlib.resources import files

    d = json.loads((files("bayesmanifold.experiments") / "em_vs_sgd_recorded.json").read_text(encoding="utf-8"))
    assert round(d["sgd"]["final_loss_mean"], 4) == 2.0310 and round(d["sgd"]["final_loss_std"], 4) == 0.0214
    assert round(d["em_like"]["final_loss_mean"], 4) == 1.9319 and round(d["em_like"]["final_loss_std"], 4) == 0.0258
    assert round(d["steps_to_sgd_final_mean"]) == 458 and round(d["steps_to_sgd_final_std"]) == 164
    # the default science settings, recorded with the earlier block sizes (tile 128, 24 runs per pass)
    assert EMvsSGDConfig.from_dict(d["config"]) == EMvsSGDConfig(probes=True, tile=128, batch_chunk=24)


def test_blocks_do_not_depend_on_workers():
    """Row blocks depend on the batch size and chunk only; one process and two (this one and a
    worker process) give the same bits."""
    from bayesmanifold.experiments.em_vs_sgd.trainer import RunSpec, split_rows, train_runs
    from bayesmanifold.windtunnels.sticky_chain import StickyChainConfig, sample_sticky_chain

    for n in range(1, 40):
        blocks = split_rows(n, 6)
        sizes = [b.stop - b.start for b in blocks]
        assert blocks[0].start == 0 and blocks[-1].stop == n and all(a.stop == b.start for a, b in zip(blocks, blocks[1:]))
        assert max(sizes) <= 6 and max(sizes) - min(sizes) <= 1 and len(blocks) >= min(n, 2)
    chain = StickyChainConfig(length=97)
    data = {(s, False): sample_sticky_chain(chain, seed=s) for s in (1, 2, 3)}
    specs = [RunSpec("sgd", s, (s, False), "sgd", (0.05,) * 4) for s in (1, 2, 3)]
    specs += [RunSpec("m", 2, (2, False), "mstep", (0.05, 0.05, 0.0, 0.05), 1.0),
              RunSpec("a", 3, (3, False), "adam", (0.01,) * 4)]
    before = torch.get_num_threads()
    outs = [train_runs(specs, data, steps=4, tile=16, chunk=2, device=torch.device("cpu"), workers=w) for w in (1, 2)]
    assert torch.get_num_threads() == before
    assert (outs[0].curves == outs[1].curves).all()
    for a, b in zip(outs[0].weights, outs[1].weights):
        assert torch.equal(a, b)


def test_block_groups_and_a_failing_worker():
    """Blocks go to worker groups whole and in order; a worker that fails raises with its stderr."""
    from bayesmanifold.experiments.em_vs_sgd.trainer import group_blocks, split_rows
    from bayesmanifold.experiments.em_vs_sgd.worker import WorkerProcess

    for n in range(1, 40):
        for k in (1, 2, 3):
            groups = group_blocks(split_rows(n, 6), k)
            flat = [sl for g in groups for sl in g]
            assert flat == split_rows(n, 6) and 1 <= len(groups) <= k and all(groups)
    assert [sum(sl.stop - sl.start for sl in g) for g in group_blocks(split_rows(35, 6), 2)] == [18, 17]
    with pytest.raises(RuntimeError, match="(?s)worker process failed.*unexpected keyword"):
        WorkerProcess({"no_such_argument": 1}).result()


def test_worker_runs_the_callers_package_whatever_the_working_directory(tmp_path, monkeypatch):
    """The worker takes the caller's sys.path: a package of the same name in the working directory
    (where `python -c` would look first) is not imported."""
    from bayesmanifold.experiments.em_vs_sgd.trainer import RunSpec, train_runs
    from bayesmanifold.windtunnels.sticky_chain import StickyChainConfig, sample_sticky_chain

    (tmp_path / "bayesmanifold").mkdir()
    (tmp_path / "bayesmanifold" / "__init__.py").write_text("raise ImportError('the wrong bayesmanifold')\n")
    monkeypatch.chdir(tmp_path)
    data = {(s, False): sample_sticky_chain(StickyChainConfig(length=61), seed=s) for s in (1, 2)}
    specs = [RunSpec("sgd", s, (s, False), "sgd", (0.05,) * 4) for s in (1, 2)]
    out = train_runs(specs, data, steps=2, tile=16, chunk=1, device=torch.device("cpu"), workers=2)
    ref = train_runs(specs, data, steps=2, tile=16, chunk=1, device=torch.device("cpu"), workers=1)
    assert (out.curves == ref.curves).all()


def test_reproduce_imports_no_transformer_lens():
    """TransformerLens (seconds to import) loads only when the probes or the deep variant run."""
    import subprocess
    import sys

    code = ("import sys, bayesmanifold.commands.reproduce, bayesmanifold.experiments.em_vs_sgd, "
            "bayesmanifold.experiments.em_vs_sgd.deep; print('transformer_lens' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
