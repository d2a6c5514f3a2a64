"""The routing law's tolerance follows the size of what was summed (issue 27, item 1), and a model
left in train mode with active dropout is named, never a bare failure (item 2).

Oracle: a constructed attention-sink head (helpers.make_sink_model) whose law value α(b − b̄) is
~e^-25 of its terms α b and α b̄. A tolerance relative to max|∂L/∂s| failed it at some batch sizes
and passed it at others; the per-row bound tol · Σ_j α_ij|b_ij| must give one verdict for batch
sizes 1 to 8, in float32 and float64, while a corrupted gradient still fails.
"""

import json
import warnings

import pytest
import torch
from helpers import make_model, make_sink_model

from bayesmanifold.analyses import RoutingLawCheck, verify_routing_law
from bayesmanifold.analyses.routing_law_result import TOLERANCE_MODEL
from bayesmanifold.cli import main
from bayesmanifold.hooks import capture


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_sink_head_verdict_does_not_flip_with_batch_size(dtype):
    model = make_sink_model(dtype)
    verdicts = {}
    for bs in range(1, 9):
        tokens = torch.randint(0, 50, (bs, 32), generator=torch.Generator().manual_seed(bs))
        law, _ = verify_routing_law(model, tokens, advantage_stats=False)
        sink = next(r for r in law.rows if (r["layer"], r["head"]) == (0, 0))
        # it is a sink: nearly all attention on key 0, so the law's value is far below its terms
        assert sink["max_abs_dscores"] < 1e-3 * sink["max_row_scale"]
        assert sink["max_abs_residual_dscores"] <= sink["abs_tolerance_dscores"]
        verdicts[bs] = law.holds
        assert law.holds, law.reason
    assert set(verdicts.values()) == {True}


def test_sink_head_still_fails_a_corrupted_gradient(gen):
    """The bound follows the terms, not the residual: a wrong ∂L/∂s on the sink head fails."""

    class Corrupt(RoutingLawCheck):
        def update(self, b):
            gs = b.grad_scores.clone()
            gs[:, 0] += 1e-6 * b.pattern[:, 0] * b.grad_pattern[:, 0].abs()  # stays 0 where α = 0
            b.grad_scores = gs
            super().update(b)

    model = make_sink_model(torch.float64)
    check = Corrupt()
    with capture(model, accumulators=[check], layers=[0]) as cap:
        cap.run(torch.randint(0, 50, (2, 32), generator=gen))
    res = check.finalize()
    row = next(r for r in res.rows if r["head"] == 0)
    assert not row["holds"] and "rounding bound" in row["reason"]


def test_result_states_its_tolerance_model(gen):
    law, _ = verify_routing_law(make_model(torch.float32), torch.randint(0, 50, (2, 12), generator=gen))
    d = law.to_dict()
    assert d["tolerance_model"] == TOLERANCE_MODEL and "Σ_j α_ij|b_ij|" in d["tolerance_model"]
    assert d["tolerance"] == pytest.approx(torch.finfo(torch.float32).eps ** (2 / 3))
    assert all("abs_tolerance_dscores" in h and "terms_residual_dscores" in h for h in d["heads"])
    json.dumps(d)


def test_train_mode_with_dropout_is_named(hf_gpt2_dir, gen):
    from bayesmanifold.backends import load_model

    model = load_model(str(hf_gpt2_dir)).train()
    tokens = torch.randint(0, 60, (2, 12), generator=gen)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        law, _ = verify_routing_law(model, tokens, advantage_stats=False)
    if not any(m.training and getattr(m, "p", 0) > 0 for m in model.modules()):
        pytest.skip("this TransformerLens builds the model without dropout modules")
    assert any("train mode with active dropout" in str(w.message) for w in caught)
    assert law.reason.startswith("the model is in train mode with active dropout") and "eval()" in law.reason
    assert law.to_dict()["mode"]
    assert model.training  # the user's mode is left as found
    model.eval()
    law, _ = verify_routing_law(model, tokens, advantage_stats=False)
    assert law.holds and not law.mode


def test_verify_exits_1_when_a_law_does_not_hold(tmp_path, capsys, monkeypatch):
    """A script or CI must be able to tell: exit 1 (documented in --help) when verify says NO."""
    real_init = RoutingLawCheck.__init__
    monkeypatch.setattr(RoutingLawCheck, "__init__", lambda self, tolerance=None: real_init(self, tolerance=1e-300))
    out = tmp_path / "v.json"
    assert main(["verify", "--seq-len", "16", "--batch-size", "1", "--json", str(out)]) == 1
    assert "hold on every head: NO" in capsys.readouterr().out
    assert json.loads(out.read_text())["holds"] is False
    monkeypatch.setattr(RoutingLawCheck, "__init__", real_init)
    assert main(["verify", "--seq-len", "16", "--batch-size", "1"]) == 0
    with pytest.raises(SystemExit):
        from bayesmanifold.cli import build_parser

        build_parser().parse_args(["verify", "--help"])
    assert "exit codes: 0" in capsys.readouterr().out
