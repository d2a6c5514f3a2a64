"""Writing a scan's results: tidy table (CSV, Parquet), summary.json, heatmaps, one HTML page.

Every file is written atomically (:mod:`bayesmanifold.io`): a reader never sees half a file.
"""

import base64
import html
import io
import math
from pathlib import Path
from typing import Any

from ..io import atomic_write, atomic_write_json, atomic_write_text, ensure_dir
from .result import ScanResult

__all__ = ["write_outputs"]


def write_outputs(result: ScanResult, out: str | Path, *, figures: bool = True) -> list[str]:
    """Write ``heads.csv`` (and ``heads.parquet`` if pyarrow imports), ``summary.json``,
    ``figures/<stat>.png`` (unless ``figures`` is False) and ``index.html`` to ``out``; returns
    the paths written."""
    d = ensure_dir(out)
    written = []
    df = result.to_dataframe()
    written.append(str(atomic_write(d / "heads.csv", lambda p: df.to_csv(p, index=False))))
    try:
        import pyarrow  # noqa: F401

        written.append(str(atomic_write(d / "heads.parquet", lambda p: df.to_parquet(p, index=False))))
    except ImportError:
        pass
    written.append(str(atomic_write_json(d / "summary.json", result.to_dict())))
    figs = _figures(result, ensure_dir(d / "figures")) if figures else []
    written += [str(p) for p, _ in figs]
    written.append(str(atomic_write_text(d / "index.html", _html(result, figs))))
    return written


def _figures(result: ScanResult, fig_dir: Path) -> list[tuple[Path, bytes]]:
    import matplotlib.pyplot as plt

    out = []
    for col, _, _ in result.heatmap_columns():
        fig, ax = plt.subplots(figsize=(max(5.0, 1.6 + 0.45 * _n(result, "head")), max(2.8, 1.4 + 0.4 * _n(result, "layer"))))
        try:
            result.plot(col, ax=ax)
            fig.tight_layout()
            buf = io.BytesIO()
            fig.savefig(buf, format="png", dpi=110)
        finally:
            plt.close(fig)
        data = buf.getvalue()
        path = atomic_write(fig_dir / f"{col}.png", lambda p, data=data: p.write_bytes(data))
        out.append((path, data))
    return out


def _n(result: ScanResult, key: str) -> int:
    return len({r[key] for r in result.rows})


def _fmt(v: Any) -> str:
    if isinstance(v, bool) or v is None:
        return str(v)
    if isinstance(v, float):
        return "NaN" if math.isnan(v) else f"{v:.4g}"
    return html.escape(str(v))


def _html(result: ScanResult, figs: list[tuple[Path, bytes]]) -> str:
    s = result.summary
    data, model, cfg = s.get("data", {}), s.get("model", {}), s.get("config", {})
    facts = [
        ("model", model.get("name", "")),
        ("layers × heads", f"{model.get('n_layers', '?')} × {model.get('n_heads', '?')}"),
        ("corpus", data.get("source", "")),
        ("read as", f"{data.get('format', '')}, {data.get('tokenization', '')}"),
        ("tokens", s.get("n_tokens")),
        ("sequences", f"{s.get('n_sequences')} of length {cfg.get('seq_len')}"),
        ("processes", s.get("world_size")),
        ("measures", ", ".join(cfg.get("measures", []))),
        ("max relative routing-law residual", s.get("max_rel_residual_dscores")),
        ("routing law holds on every head", s.get("routing_law_holds")),
    ]
    fact_rows = "\n".join(f"<tr><th>{html.escape(k)}</th><td>{_fmt(v)}</td></tr>" for k, v in facts)
    imgs = "\n".join(
        f'<figure><img alt="{html.escape(p.stem)}" src="data:image/png;base64,{base64.b64encode(b).decode()}">'
        f"<figcaption>{html.escape(p.stem)}</figcaption></figure>"
        for p, b in figs
    )
    cols = list(result.rows[0]) if result.rows else []
    head = "".join(f"<th>{html.escape(c)}</th>" for c in cols)
    body = "\n".join("<tr>" + "".join(f"<td>{_fmt(r.get(c))}</td>" for c in cols) + "</tr>" for r in result.rows)
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>bayesmanifold scan</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em; color: #222; }}
table {{ border-collapse: collapse; font-size: 12px; }}
th, td {{ border: 1px solid #ccc; padding: 2px 6px; text-align: right; }}
th {{ background: #f4f4f4; }}
.facts th {{ text-align: left; }}
figure {{ display: inline-block; margin: 0.5em; }}
figcaption {{ text-align: center; font-size: 12px; }}
.wide {{ overflow-x: auto; }}
</style></head><body>
<h1>Corpus scan</h1>
<table class="facts">
{fact_rows}
</table>
<h2>Per-head statistics (layer × head)</h2>
{imgs}
<h2>Table</h2>
<div class="wide"><table><tr>{head}</tr>
{body}
</table></div>
<p>Files: heads.csv (tidy, one row per layer and head), summary.json, figures/*.png.</p>
</body></html>
"""
