"""The result of a corpus scan: one row per (layer, head) and a JSON summary."""

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import InputError
from .measures import MEASURES

__all__ = ["ScanResult", "build_result", "scan_differences", "HEATMAP_STATS"]

#: statistics drawn as layer × head heatmaps (those present in a scan): (column, title, log scale)
HEATMAP_STATS = (
    ("rel_residual_dscores", "routing-law relative residual", True),
    ("mass_positive", "attention mass on keys with positive advantage", False),
    ("frac_positive", "share of entries with positive advantage", False),
    ("alpha_weighted_abs_adv", "α-weighted |advantage|", False),
    ("routing_effective_keys", "routing gradient: effective keys per query", False),
    ("attention_entropy", "attention entropy (nats)", False),
    ("value_update_norm_mean", "mean value-update norm ‖Σ_i α_ij u_i‖", True),
    ("spec_specialist_share", "share of specialist values (position buckets)", False),
    ("value_pc1_share", "PC1 share of the value vectors", False),
)


def _plain(v: Any) -> Any:
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, dict):
        return {k: _plain(x) for k, x in v.items()}
    if isinstance(v, list | tuple):
        return [_plain(x) for x in v]
    if isinstance(v, np.ndarray):
        return v.tolist()
    return v


@dataclass(frozen=True, eq=False)
class ScanResult:
    """Per-head statistics of a scan, and what was scanned.

    Attributes:
        rows: one dict per (layer, head), every measure's columns side by side.
        summary: the JSON summary (``n_tokens``, ``n_sequences``, ``world_size``,
            ``max_rel_residual_dscores``, model, data, configuration, per-measure summaries);
            :meth:`to_dict` adds ``heads``.
        results: each measure's finalized result value, by measure name.
    """

    rows: list[dict[str, Any]]
    summary: dict[str, Any]
    results: dict[str, Any]

    @property
    def n_tokens(self) -> int:
        return int(self.summary["n_tokens"])

    def to_dataframe(self):
        """Tidy: one row per (layer, head)."""
        import pandas as pd

        return pd.DataFrame(self.rows)

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe: the summary and ``heads``, one object per layer and head."""
        return {**self.summary, "heads": [dict(r) for r in self.rows]}

    def heatmap_columns(self) -> list[tuple[str, str, bool]]:
        """The :data:`HEATMAP_STATS` this scan has a finite value for."""
        out = []
        for col, title, log in HEATMAP_STATS:
            vals = [r.get(col) for r in self.rows]
            if any(isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) for v in vals):
                out.append((col, title, log))
        return out

    def plot(self, stat: str = "mass_positive", ax=None):
        """Layer × head heatmap of one per-head statistic (log10 for residuals and norms)."""
        import matplotlib.pyplot as plt

        cols = {c: (t, lg) for c, t, lg in HEATMAP_STATS}
        if not self.rows or stat not in self.rows[0]:
            have = sorted(self.rows[0]) if self.rows else []
            raise InputError(f"no per-head statistic {stat!r} in this scan; columns: {', '.join(have)}")
        title, log = cols.get(stat, (stat, False))
        layers = sorted({r["layer"] for r in self.rows})
        heads = sorted({r["head"] for r in self.rows})
        grid = np.full((len(layers), len(heads)), np.nan)
        for r in self.rows:
            v = r[stat]
            grid[layers.index(r["layer"]), heads.index(r["head"])] = float(v) if v is not None else np.nan
        if log:
            with np.errstate(divide="ignore", invalid="ignore"):
                grid = np.log10(np.where(grid > 0, grid, np.nan))
            title = f"log10 {title}"
        if ax is None:
            _, ax = plt.subplots(figsize=(1.2 + 0.45 * len(heads), 1.2 + 0.4 * len(layers)))
        im = ax.imshow(grid, aspect="auto", cmap="viridis", interpolation="nearest")
        ax.set_xticks(range(len(heads)), heads, fontsize=7)
        ax.set_yticks(range(len(layers)), layers, fontsize=7)
        ax.set_xlabel("head")
        ax.set_ylabel("layer")
        ax.set_title(title, fontsize=9)
        ax.figure.colorbar(im, ax=ax)
        return ax


def build_result(accumulators: dict[str, Any], summary: dict[str, Any]) -> ScanResult:
    """Finalize every measure's accumulator and join their per-head rows."""
    results = {name: acc.finalize() for name, acc in accumulators.items()}
    by_head: dict[tuple[int, int], dict[str, Any]] = {}
    measure_summaries = {}
    for name, res in results.items():
        m = MEASURES[name]
        for r in m.rows(res):
            key = (int(r["layer"]), int(r["head"]))
            row = by_head.setdefault(key, {"layer": key[0], "head": key[1]})
            row.update({k: _plain(v) for k, v in r.items() if k not in ("layer", "head")})
        s = m.summary(res)
        if s:
            measure_summaries[name] = _plain(s)
    rows = [by_head[k] for k in sorted(by_head)]
    routing = results.get("routing")
    full = {
        **summary,
        "max_rel_residual_dscores": float(routing.max_rel_residual_dscores) if routing is not None else float("nan"),
        "routing_law_holds": bool(routing.holds) if routing is not None else None,
        "measure_summaries": measure_summaries,
    }
    return ScanResult(rows=rows, summary=full, results=results)


def _heads_of(scan: "ScanResult | dict | str | os.PathLike") -> dict[tuple[int, int], dict[str, Any]]:
    if isinstance(scan, ScanResult):
        rows = scan.rows
    elif isinstance(scan, dict):
        rows = scan.get("heads", [])
    else:
        p = Path(scan)
        f = p / "summary.json" if p.is_dir() else p
        if not f.is_file():
            raise InputError(f"{str(scan)!r} is neither a scan directory (with summary.json) nor a scan's JSON file")
        try:
            rows = json.loads(f.read_text(encoding="utf-8")).get("heads", [])
        except (OSError, ValueError, AttributeError) as exc:
            raise InputError(f"cannot read the scan summary {str(f)!r}: {exc}") from None
    if not rows:
        raise InputError(f"the scan {scan if not isinstance(scan, ScanResult) else 'result'} holds no per-head rows")
    return {(int(r["layer"]), int(r["head"])): r for r in rows}


def scan_differences(a: "ScanResult | dict | str | os.PathLike", b: "ScanResult | dict | str | os.PathLike") -> dict[str, float]:
    """How far two scans of the same corpus agree (e.g. one process and ``torchrun``, or a merge):
    for every numeric per-head column, the largest relative difference over heads,
    ``|x_a − x_b| / max(|x_a|, |x_b|)`` (0 where both are 0; NaN in both counts as equal, in one
    as 1). Each argument is a :class:`ScanResult`, its :meth:`~ScanResult.to_dict`, a scan's
    output directory or its JSON file.

    Raises:
        InputError: a scan that cannot be read, or scans of different heads.
    """
    ha, hb = _heads_of(a), _heads_of(b)
    if set(ha) != set(hb):
        raise InputError(f"the scans measured different heads ({len(ha)} and {len(hb)}; "
                         f"{len(set(ha) ^ set(hb))} differ): compare scans of the same model and layers")
    out: dict[str, float] = {}
    for col in ha[next(iter(ha))]:
        if col in ("layer", "head"):
            continue
        worst = 0.0
        for key, ra in ha.items():
            x, y = ra.get(col), hb[key].get(col)
            if isinstance(x, bool) and isinstance(y, bool):
                worst = max(worst, float(x != y))
                continue
            if isinstance(x, bool) or isinstance(y, bool) or not isinstance(x, int | float) or not isinstance(y, int | float):
                continue
            if math.isnan(x) or math.isnan(y):
                worst = max(worst, 0.0 if math.isnan(x) and math.isnan(y) else 1.0)
                continue
            scale = max(abs(x), abs(y))
            worst = max(worst, abs(x - y) / scale if scale > 0 else 0.0)
        out[col] = worst
    return out
