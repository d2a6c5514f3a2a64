"""The routing-map page: one self-contained HTML file (inline CSS and JavaScript, no network).

:func:`render_map` takes the map's metadata, one summary row per measured head and the matrices
of the kept heads, and returns the page text. The page shows the layer × head grid (every head of
the model, shaded by a summary chosen in a menu) and a sortable table of the summaries; the
picked head's query × key matrix (routing force by default, or advantage, attention α,
compatibility b) drawn on a canvas with a diverging colour scale whose sign convention is written
beside it; a hover box with α, b, b̄, A and the force of the entry under the pointer; and the
prompt's tokens as a strip coloured by the head's net push per key.

The matrices travel as 8-bit logarithmic codes, deflated and base64-encoded per head
(:mod:`.encoding`); the script inflates a head's block only when the head is picked, so a page of
all 270 heads of a 256-token prompt stays under 25 MB and opens in about a second.

``map.html#L.H`` opens head L.H (``#L.H/pattern``: its attention; also ``advantage``,
``compat``; ``#L.H/force/sqrt``: on the signed √ scale). After drawing, the script sets
``data-drawn="L.H"``, ``data-cells`` (entries drawn), ``data-nonzero`` (entries with a non-zero
value) and ``data-draw-ms`` (milliseconds from navigation start to the drawn map) on ``<body>``:
a headless browser's DOM dump shows that the heat map was drawn, and how fast.
"""

import html
import json
import math
from typing import Any

from .encoding import ALPHA_DECADES, FORCE_DECADES, encode_head
from .template import PAGE

__all__ = ["render_map"]

#: summaries the grid can be shaded by (the menu), with their labels
SHADES = {"total_abs_force": "Σ|force|", "mass_positive": "α on A>0", "entropy": "entropy",
          "max_abs_push": "max|push|", "max_value_update": "max‖Δv‖", "induction": "induction",
          "previous_token": "previous token", "law_residual": "law resid."}


def _num(x: Any) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "null"
    return f"{float(x):.4g}"


def _vec(xs: Any) -> str:
    return "[" + ",".join(_num(x) for x in xs) + "]"


def render_map(meta: dict[str, Any], rows: list[dict[str, Any]], mats: dict[tuple[int, int], dict[str, Any]], *,
               title: str | None = None, shade: str = "total_abs_force") -> str:
    """The HTML page of a routing map.

    Args:
        meta: ``tokens``, ``token_ids``, ``objective``, ``loss``, ``prompt``, ``n_layers``,
            ``n_heads``, ``by`` (the summary the kept heads were chosen by).
        rows: per measured head ``layer``, ``head``, ``kept`` and the summaries (JSON-safe).
        mats: per kept ``(layer, head)``: ``pattern`` and ``force`` ``[query, key]`` arrays (force
            NaN on masked entries), ``compat_mean`` [query], ``push`` and ``value_update`` [key].
        shade: the summary that shades the grid when the page opens.
    """
    n = len(meta["tokens"])
    blocks = []
    for (layer, head), m in mats.items():
        blob, fmax = encode_head(m["pattern"], m["force"])
        blocks.append(f'"{layer}.{head}":{{"z":"{blob}","fmax":{_num(fmax)},"bbar":{_vec(m["compat_mean"])},'
                      f'"push":{_vec(m["push"])},"vu":{_vec(m["value_update"])}}}')
    loss = meta.get("loss")
    page_meta = {"tokens": meta["tokens"], "token_ids": meta["token_ids"], "objective": meta.get("objective"),
                 "loss": loss if isinstance(loss, float) and math.isfinite(loss) else None, "n": n,
                 "n_layers": meta.get("n_layers") or 1 + max((r["layer"] for r in rows), default=0),
                 "n_heads": meta.get("n_heads") or 1 + max((r["head"] for r in rows), default=0),
                 "by": meta.get("by"), "shade": shade if shade in SHADES else "total_abs_force", "shades": SHADES,
                 "alpha_decades": ALPHA_DECADES, "force_decades": FORCE_DECADES}
    payload = ('{"meta":' + json.dumps(page_meta) + ',"rows":' + json.dumps(rows, allow_nan=False)
               + ',"mats":{' + ",".join(blocks) + "}}")
    payload = payload.replace("</", "<\\/")
    name = title or "Routing map"
    prompt = meta.get("prompt") or ""
    return (PAGE.replace("%%TITLE%%", html.escape(name))
            .replace("%%PROMPTLEN%%", str(n))
            .replace("%%PROMPT%%", html.escape(prompt[:2000] + ("…" if len(prompt) > 2000 else "")))
            .replace("%%DATA%%", payload))
