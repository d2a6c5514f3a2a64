"""The claims table's two protocols: the authors' column is judged on the same thresholds as ours."""

from bayesmanifold.report.claims import judge_claims
from bayesmanifold.report.document import Report


def _measured(pc1_authors, focus_authors):
    vm = {"pc1_share": pc1_authors, "pc12_share": pc1_authors + 0.05, "best_pearson": -0.9, "best_pc": 1,
          "position_share": 0.1, "pc1_position_r2": 0.2, "within_pc1_share": 0.5, "spearman_pc1": 0.9}
    return {
        "task": {"task": "bijection"},
        "calibration": {"entropy_mae_bits": 0.002, "mean_kl_bits": 0.0003},
        "analyze": {"key_orthogonality": [0.05], "value_pc1": 0.18, "value_pc12": 0.23, "spearman_pc1_entropy": 0.93,
                    "attention_entropy_reduction": 0.24},
        "protocols": {"value_manifold": {"value_positions": vm, "prefix_last": vm},
                      "attention_focusing": {"elimination": {"reduction": focus_authors},
                                             "elimination_final": {"reduction": 0.5}},
                      "frame_first": {"authors": {"built": False, "note": "not built"}}},
    }


def test_authors_column_is_judged_beside_ours():
    f = {x.claim.split(" ")[0]: x for x in judge_claims(_measured(0.86, 0.88))}
    man, foc = f["Representations"], f["Attention"]
    assert man.held is False and man.authors_held is True and "PC1 86.0%" in man.authors_measured
    assert foc.held is False and foc.authors_held is True and "88% at elimination" in foc.authors_measured
    g = {x.claim.split(" ")[0]: x for x in judge_claims(_measured(0.15, 0.24))}
    assert g["Representations"].authors_held is False and g["Attention"].authors_held is False
    assert g["The"].authors_measured.startswith("entropy MAE") and "same definition" in g["The"].authors_note
    # key orthogonality has no authors' protocol here: its column stays empty
    assert g["Keys"].authors_measured == ""


def test_no_protocols_no_authors_column_and_html_has_the_columns():
    m = _measured(0.15, 0.24)
    del m["protocols"]
    assert all(x.authors_measured == "" for x in judge_claims(m))
    rep = Report("t")
    rep.claims = judge_claims(_measured(0.15, 0.24))
    page = rep.render_html()
    assert "authors' protocol, this model" in page and "our protocol, this model" in page
