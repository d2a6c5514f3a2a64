"""The induction-dynamics study and the stdlib checkpoint metrics, end to end on a tiny text run."""

import json

import numpy as np
import pytest

from bayesmanifold.cli import main
from bayesmanifold.experiments.induction_dynamics import induction_dynamics, write_outputs
from bayesmanifold.experiments.stdlib_models import checkpoint_metrics, rise_step


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("text") / "run"
    argv = ["train", "text", "--param", "max_files=8", "--param", "seq_len=32", "--preset", "stdlib-attn2",
            "--steps", "8", "--batch-size", "4", "--eval-every", "4", "--n-eval", "8", "--snapshots", "4",
            "--no-progress", "--threads", "1", "--out", str(out)]
    assert main(argv) == 0
    return out


def test_dynamics_tables_figures_and_json(tiny_run, tmp_path):
    res = induction_dynamics(str(tiny_run), n_seqs=2, half=12)
    assert res.steps == [0, 1, 3, 8]
    snaps, ints = res.to_dataframe("snapshots"), res.to_dataframe()
    assert len(snaps) == 4 * 2 * 8 and len(ints) == 3 * 2 * 8
    assert set(ints.phase) <= {"before", "during", "after", "unknown"}
    assert ((ints.sign_agree >= 0) & (ints.sign_agree <= 1)).all()
    assert np.isfinite(ints.r_pred).mean() > 0.5
    assert res.dynamics["n_checkpoints"] == 4 and len(res.dynamics["frame_distance_to_final"]) == 4
    paths = write_outputs(res, tmp_path / "fig")
    for k in ("scores", "routing", "timescales", "json"):
        assert (tmp_path / "fig").joinpath(paths[k].split("/")[-1]).stat().st_size > 1000
    d = json.loads((tmp_path / "fig" / "induction_dynamics.json").read_text())
    assert d["steps"] == [0, 1, 3, 8] and "phase_summary" in d
    lead = res.lead("code")  # the induction head's row of each snapshot, as recorded
    L, H = res.induction_head
    mine = snaps[(snaps.probe == "code") & (snaps.layer == L) & (snaps["head"] == H)]
    assert [r["step"] for r in lead] == res.steps
    np.testing.assert_allclose([r["targets_A_positive"] for r in lead], mine.frac_force_positive)
    np.testing.assert_allclose([r["alpha_on_target"] for r in lead], mine.score)
    again = type(res).from_dict(d)  # the recorded JSON gives the same lead
    assert again.lead("repeated") == res.lead("repeated")


def test_checkpoint_metrics(tiny_run):
    m = checkpoint_metrics(str(tiny_run), n_seqs=2, half=12)
    assert m["snapshot_steps"] == [0, 1, 3, 8] and len(m["heads"]) == 8
    assert m["heldout_loss"] > 0 and m["n_tiny_windows"] == 8 and len(m["corpus_sha256"]) == 64
    assert np.array(m["induction_per_snapshot"]).shape == (4, 8)
    assert rise_step([0, 10, 20, 30], np.array([0.0, 0.1, 0.5, 0.6])) == 20
    assert rise_step([0, 10], np.array([0.0, 0.1])) is None
