"""The claims table's second protocol: each geometric claim judged on the authors' protocol.

A judge here reads ``m["protocols"]`` (the :class:`bayesmanifold.analyses.ProtocolResult` numbers
that ``report`` and ``analyze --protocol authors`` store) and returns a verdict for the column
"authors' protocol on this model", beside the column of our protocol (:mod:`.claims`). The
thresholds are the same as ours: a definition is compared, not a looser bar.
"""

import math
from collections.abc import Mapping
from typing import Any

__all__ = ["AUTHORS_JUDGES", "authors_verdict"]


def _num(x: Any) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def _manifold(m: Mapping[str, Any], t: Mapping[str, float]) -> tuple[bool | None, str, str]:
    vm = m["protocols"]["value_manifold"]
    main = vm.get("value_positions") or vm["prefix_last"]
    where = "value positions" if "value_positions" in vm else "prefix ends"
    r = main["best_pearson"]
    held = bool(main["pc1_share"] >= t["pc1"] and _num(r) and abs(r) >= t["abs_spearman"]) if "task" in m else None
    text = (f"{where}: PC1 {_pct(main['pc1_share'])}, PC1+PC2 {_pct(main['pc12_share'])}, "
            f"strongest |r| with entropy {abs(r):.2f} (PC{main['best_pc']}); position carries "
            f"{_pct(main['position_share'])} of the variance and {_pct(main['pc1_position_r2'])} of PC1; "
            f"PC1 within position {_pct(main['within_pc1_share'])}")
    if "value_positions" in vm:
        pl = vm["prefix_last"]
        text += (f". Prefix ends: PC1 {_pct(pl['pc1_share'])}, |ρ| {abs(pl['spearman_pc1']):.2f}, "
                 f"{_pct(pl['pc1_position_r2'])} of PC1 is position")
    return held, text, "final residual after the final norm, unstandardised (geometric_analysis.py)"


def _focusing(m: Mapping[str, Any], t: Mapping[str, float]) -> tuple[bool | None, str, str]:
    af = m["protocols"]["attention_focusing"]
    main = next(k for k in af if not k.endswith("_final"))
    red, final = af[main]["reduction"], af.get(f"{main}_final", {}).get("reduction")
    text = f"{100 * red:.0f}% at {main} positions" + (f" ({100 * final:.0f}% at the last one only)" if _num(final) else "")
    return bool(red >= t["windtunnel"]), text, "analyze_icl_sula.py definition, bits, mean over heads then prompts"


def _calibration(m: Mapping[str, Any], t: float) -> tuple[bool | None, str, str]:
    cal = m["protocols"].get("calibration")
    if not cal:  # bijection: the authors' entropy MAE is our definition
        c = m.get("calibration")
        if not c:
            return None, "—", ""
        return bool(c["entropy_mae_bits"] <= t), f"entropy MAE {c['entropy_mae_bits']:.4f} bits", "the same definition as ours"
    K = m["protocols"].get("config", {}).get("hmm_K", 15)
    main = cal.get(f"K{K}") or next(iter(cal.values()))
    if "mean_kl_bits" not in main:
        return None, main.get("skipped", "—"), ""
    others = ", ".join(f"{k}: {v['mean_kl_bits']:.4f}" for k, v in cal.items() if k != f"K{K}" and "mean_kl_bits" in v)
    return (bool(main["mean_kl_bits"] <= t), f"mean KL {main['mean_kl_bits']:.4f} bits at K = {main['K']}, "
            f"{main['n_seqs']} sequences" + (f" ({others})" if others else ""),
            "eval_length_gen.py; their own figure script hard-codes 0.049 bits")


def _frame(m: Mapping[str, Any], t: float) -> tuple[bool | None, str, str]:
    return None, "not built", m["protocols"]["frame_first"]["authors"]["note"]


AUTHORS_JUDGES = {
    "value_manifold": _manifold,
    "attention_focusing": _focusing,
    "calibration": _calibration,
    "two_timescales": _frame,
}


def authors_verdict(claim: str, m: Mapping[str, Any], threshold: Any) -> tuple[bool | None, str, str] | None:
    """(held, measured, note) of ``claim`` on the authors' protocol, or None where there is none
    (an exact identity, or no ``protocols`` numbers in ``m``)."""
    judge = AUTHORS_JUDGES.get(claim)
    if judge is None or not isinstance(m.get("protocols"), Mapping):
        return None
    return judge(m, threshold)
