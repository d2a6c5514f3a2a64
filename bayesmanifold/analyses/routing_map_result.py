"""The result of a routing map (:class:`RoutingMap`) and how it is written: a summary JSON, the
matrices in a compressed ``.npz`` beside it, and the HTML page.

The equations are in :mod:`bayesmanifold.analyses.routing_maps`. A map of a real model holds
per-head summaries for every head it measured (the head grid) and the query × key matrices of
the heads it kept (all of them, or the ``top`` K by a summary): α, the advantage A and the
routing force αA, stored as float32 (float64 on request), never the N² compatibility b (it is
b̄ − A).

**The .npz encoding** (:meth:`RoutingMap.save_npz`), arrays [head, query, key] over the kept
heads: ``pattern`` float16 α; ``advantage`` float16 A divided by a per-head scale
(``advantage_scale`` float64, the head's max |A|), so A = ``advantage * advantage_scale[:, None,
None]`` with float16's relative precision (about 5e-4) down to 6e-5 of the head's maximum; NaN
marks masked entries (the query cannot see the key). The force is their product, α·A (no
cancellation: relative error about 1e-3), and b = b̄ − A. ``compat_mean`` b̄ [head, query],
``push`` and ``value_update`` [head, key] float32; ``heads`` [head, 2] (layer, head);
``token_ids``. :func:`load_npz_matrices` returns α, A and the force as float32.
"""

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import InputError, SelectionError

__all__ = ["RoutingMap", "SUMMARIES", "RANKABLE", "load_npz_matrices"]

#: per-head summaries, in the order the page and the tables show them
SUMMARIES = ("total_abs_force", "mass_positive", "entropy", "max_abs_push", "top_push_key", "max_value_update",
             "induction", "previous_token", "law_residual")
#: summaries a map can keep its ``top`` heads by (largest first)
RANKABLE = ("total_abs_force", "mass_positive", "max_abs_push", "max_value_update", "induction", "previous_token")

_SIGN = ("force = -dL/ds_ij = alpha_ij * A_ij, A_ij = b_mean_i - b_ij; force > 0: "
         "a gradient-descent step raises s_ij (attention moves toward key j)")


@dataclass(frozen=True, eq=False)
class RoutingMap:
    """The routing map of one prompt: matrices indexed [head, query, key] / [head, query] /
    [head, key] / [head] over the kept heads ``heads`` (``heads[k] = (layer, head)``).

    ``pattern`` α (0 on masked entries); ``advantage`` A = b̄ − b and ``force`` −∂L/∂s = α A (NaN
    on masked entries); ``compat_mean`` b̄; ``push`` Σ_i force_ij per key; ``value_update``
    ‖Σ_i α_ij u_i‖ per key; ``law_residual`` max|force + ∂L/∂s| / max|∂L/∂s| per head (the
    autograd check, computed in float64 before storage). ``summaries`` has one row per measured
    head, kept or not (``"kept"``), in (layer, head) order. ``n_layers`` × ``n_heads``: the grid.
    """

    prompt: str | None
    token_ids: list[int]
    tokens: list[str]
    heads: list[tuple[int, int]]
    pattern: np.ndarray
    advantage: np.ndarray
    force: np.ndarray
    compat_mean: np.ndarray
    push: np.ndarray
    value_update: np.ndarray
    law_residual: np.ndarray
    query_valid: np.ndarray
    summaries: list[dict[str, Any]]
    loss: float
    objective: str
    n_layers: int = 0
    n_heads: int = 0
    by: str = "total_abs_force"

    @property
    def compat(self) -> np.ndarray:
        """b = ∂L/∂α = b̄ − A [head, query, key] (NaN on masked entries), computed on demand."""
        return self.compat_mean[..., None] - self.advantage

    def index(self, layer: int, head: int) -> int:
        """Row of ``(layer, head)`` in the arrays."""
        try:
            return self.heads.index((int(layer), int(head)))
        except ValueError:
            kept = ", ".join(f"{a}.{b}" for a, b in self.heads)
            raise SelectionError(f"head {layer}.{head} has no matrices in this map; it holds {kept}") from None

    def to_dataframe(self):
        """Tidy: one row per (layer, head, query, key) unmasked entry with α, b, b̄, A, force."""
        import pandas as pd

        frames = []
        for k, (layer, head) in enumerate(self.heads):
            q, j = np.nonzero(np.isfinite(self.force[k]))
            adv = self.advantage[k][q, j].astype(np.float64)
            bbar = self.compat_mean[k][q].astype(np.float64)
            frames.append(pd.DataFrame({
                "layer": layer, "head": head, "query": q, "key": j,
                "alpha": self.pattern[k][q, j], "b": bbar - adv, "b_mean": bbar,
                "advantage": adv, "force": self.force[k][q, j],
            }))
        return pd.concat(frames, ignore_index=True)

    def summary_frame(self):
        """The per-head :attr:`summaries` as a DataFrame (one row per measured head)."""
        import pandas as pd

        return pd.DataFrame(self.summaries)

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe summary (no N² matrix): prompt, tokens, objective, loss, the grid shape, one row
        per measured head with its summaries and, for kept heads, ``push``, ``value_update`` and
        ``compat_mean`` (6 significant digits). The matrices go to :meth:`save_npz`."""
        kept = {h: k for k, h in enumerate(self.heads)}
        rows = []
        for s in self.summaries:
            row = {key: _clean(v) for key, v in s.items()}
            k = kept.get((s["layer"], s["head"]))
            if k is not None:
                row.update(push=_round(self.push[k]), value_update=_round(self.value_update[k]),
                           compat_mean=_round(self.compat_mean[k]))
            rows.append(row)
        return {"prompt": self.prompt, "token_ids": list(self.token_ids), "tokens": list(self.tokens),
                "objective": self.objective, "loss": _clean(self.loss), "n_layers": self.n_layers,
                "n_heads": self.n_heads, "kept_by": self.by, "kept": [f"{a}.{b}" for a, b in self.heads],
                "sign_convention": _SIGN, "heads": rows}

    def save_npz(self, path: str | Path) -> Path:
        """The kept heads' matrices as a compressed ``.npz`` (the encoding in the module docstring),
        written atomically."""
        from ..io import atomic_write

        arrays: dict[str, np.ndarray] = {"heads": np.array(self.heads, dtype=np.int32).reshape(-1, 2),
                                         "token_ids": np.array(self.token_ids, dtype=np.int64),
                                         "pattern": self.pattern.astype(np.float16)}
        m = self.advantage
        scale = np.nan_to_num(np.nanmax(np.abs(m), axis=(-2, -1)) if m.size else np.zeros(0), nan=0.0)
        scale = np.where(scale > 0, scale, 1.0).astype(np.float64)
        arrays["advantage"] = (m / scale[:, None, None]).astype(np.float16)
        arrays["advantage_scale"] = scale
        for name in ("compat_mean", "push", "value_update"):
            arrays[name] = getattr(self, name).astype(np.float32)

        def write(p: Path) -> None:
            with open(p, "wb") as f:
                np.savez_compressed(f, **arrays)

        return atomic_write(path, write)

    def plot(self, ax=None, *, layer: int | None = None, head: int | None = None, what: str = "force"):
        """One head's ``force`` (default), ``advantage`` or ``pattern`` matrix as a heat map
        (diverging, red = positive); default head: the first kept (the strongest by ``by``)."""
        import matplotlib.pyplot as plt

        if what not in ("force", "advantage", "pattern"):
            raise InputError(f"what={what!r}; accepted: force, advantage, pattern")
        if layer is None or head is None:
            k = int(np.argmax([rank_value(s, "total_abs_force") for s in self.summaries if s["kept"]]))
        else:
            k = self.index(layer, head)
        if ax is None:
            _, ax = plt.subplots(figsize=(5, 4.4))
        m = getattr(self, what)[k].astype(np.float64)
        if what == "pattern":
            im = ax.imshow(m, cmap="Greys", vmin=0, vmax=1)
        else:
            lim = float(np.nanmax(np.abs(m))) or 1.0
            im = ax.imshow(np.ma.masked_invalid(m), cmap="RdBu_r", vmin=-lim, vmax=lim)
        ax.set_xlabel("key position j")
        ax.set_ylabel("query position i")
        name = {"force": "routing force −∂L/∂s = αA", "advantage": "advantage A = b̄ − b", "pattern": "attention α"}[what]
        ax.set_title(f"L{self.heads[k][0]}H{self.heads[k][1]}: {name}", fontsize=9)
        ax.figure.colorbar(im, ax=ax)
        return ax

    def to_html(self, *, title: str | None = None, shade: str | None = None) -> str:
        """A self-contained HTML page (inline CSS/JS, no network): the layer × head grid shaded by
        a summary (``shade``, default ``by``), the table of summaries, and the picked head's heat
        map, decoded from its compressed 8-bit codes only when the head is picked."""
        from ..maps.html import render_map

        kept = {h: k for k, h in enumerate(self.heads)}
        mats = {}
        for s in self.summaries:
            k = kept.get((s["layer"], s["head"]))
            if k is not None:
                mats[(s["layer"], s["head"])] = {"pattern": self.pattern[k], "force": self.force[k],
                                                 "compat_mean": self.compat_mean[k], "push": self.push[k],
                                                 "value_update": self.value_update[k]}
        meta = {"prompt": self.prompt, "tokens": list(self.tokens), "token_ids": list(self.token_ids),
                "objective": self.objective, "loss": _clean(self.loss), "n_layers": self.n_layers,
                "n_heads": self.n_heads, "by": self.by}
        rows = [{k: _clean(v) for k, v in s.items()} for s in self.summaries]
        return render_map(meta, rows, mats, title=title, shade=shade or self.by)


def _clean(v: Any) -> Any:
    if isinstance(v, (float, np.floating)):
        v = float(v)
        return v if np.isfinite(v) else None
    if isinstance(v, np.integer):
        return int(v)
    return v


def _round(a: np.ndarray, digits: int = 6) -> list:
    return [None if not np.isfinite(x) else float(f"{x:.{digits}g}") for x in np.asarray(a, dtype=np.float64)]


def rank_value(row: dict[str, Any], by: str) -> float:
    v = row.get(by)
    return -np.inf if v is None or not np.isfinite(v) else float(v)


def load_npz_matrices(path: str | Path) -> dict[str, np.ndarray]:
    """The arrays of a map's ``.npz``, with ``pattern`` α, ``advantage`` A (its per-head scale
    multiplied back) and ``force`` = α·A as float32 [head, query, key]."""
    with np.load(path) as z:
        out = {k: z[k] for k in z.files}
    out["advantage"] = out["advantage"].astype(np.float32) * out.pop("advantage_scale")[:, None, None].astype(np.float32)
    out["pattern"] = out["pattern"].astype(np.float32)
    out["force"] = out["pattern"] * out["advantage"]
    return out
