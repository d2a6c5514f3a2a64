"""Does the routing law predict where attention goes while induction heads form? (issue 15, item 3)

Replays the weight snapshots of a real-text checkpoint (``stdlib-attn2``) on two fixed probes:
``repeated`` — repeated random sequences (printable ASCII for a byte-level model, every ordinary
token of a BPE model; the induction target of the query at ``T + t`` is key ``t + 1``) — and ``code`` — windows of the held-out stdlib files (the
target is the key after the most recent earlier occurrence of the 3-gram ending at the query).
At every snapshot t one capture pass (forward + backward, the next-token loss of the probe) gives
per head the attention α and the routing force f = −∂L/∂s = αA (Paper II, arXiv 2512.22473, §3).

Per head and snapshot: induction score (α on the target), previous-token score, share of the
positive force of target queries that lands on the target key, fraction of targets with A > 0.
Per head and interval t → t+1 (Δα = α_{t+1} − α_t on the same probe):

- ``r_force``: Pearson correlation over every unmasked (query, key) entry of f_t and Δα;
- ``r_pred``: the same for the one-step prediction δα = α_t (f_t − Σ_k α_t f_t) (a gradient step
  on the scores, pushed through the softmax) — the routing law's forecast of the next pattern;
- ``sign_agree``: |Δα|-weighted share of entries where sign(f_t) = sign(Δα);
- ``target_gain``: mean Δα on the targets; ``gain_share_target``: of the attention that target
  queries gain, the share gained on the target key.

Intervals are labelled ``before``/``during``/``after`` the phase change of the induction score of
the strongest induction head (``rise_start``/``rise_end``: first snapshot past 10 % / 90 % of its
rise). The frame–precision timescales come from :func:`bayesmanifold.analyses.replay` on the code
probe. :func:`write_outputs` draws the figures and a JSON summary.
"""

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..analyses.induction import (
    LABEL,
    InductionAccumulator,
    induction_targets,
    ordinary_ids,
    repeated_random_tokens,
)
from ..analyses.stats import pearson
from ..backends import ModelLike, model_access
from ..backends.batch import Batch
from ..hooks import capture
from ..io import atomic_write_json, ensure_dir
from ..models.checkpoint import load_checkpoint, resolve_checkpoint
from ..models.snapshots import list_snapshots

__all__ = ["InductionDynamics", "induction_dynamics", "write_outputs", "probes"]


class _Keep:
    """Accumulator: α and the force −∂L/∂s of every head (CPU float64), per layer."""

    def __init__(self) -> None:
        self.alpha: dict[int, torch.Tensor] = {}
        self.force: dict[int, torch.Tensor] = {}
        self.valid: torch.Tensor | None = None

    def update(self, b: Any) -> None:
        self.valid = b.valid.cpu()
        self.alpha[b.layer] = b.pattern.detach().cpu().double()
        self.force[b.layer] = -b.grad_scores.detach().cpu().double().masked_fill(~self.valid[:, None], 0.0)

    def merge(self, other: "_Keep") -> "_Keep":
        return self

    def finalize(self) -> tuple[torch.Tensor, torch.Tensor]:
        layers = sorted(self.alpha)
        return torch.stack([self.alpha[L] for L in layers], 1), torch.stack([self.force[L] for L in layers], 1)


def probes(task: Any, model: ModelLike, *, n_seqs: int = 16, half: int = 48, seed: int = 0,
           min_match: int = 3) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``{"repeated": (tokens, targets), "code": (tokens, targets)}`` (fixed, seeded; the random
    ids are those :func:`~bayesmanifold.analyses.induction_scores` draws for ``model``)."""
    g = torch.Generator().manual_seed(seed)
    low, high = ordinary_ids(model_access(model))
    rep = repeated_random_tokens(n_seqs, half, low=low, high=high, generator=g)
    code = task.heldout_windows(n_seqs)
    return {"repeated": rep, "code": (code, induction_targets(code, min_match))}


def _measure(model: ModelLike, tokens: torch.Tensor, targets: torch.Tensor):
    ind, keep = InductionAccumulator(gradients=True), _Keep()
    with capture(model, accumulators=[ind, keep]) as cap:
        loss = cap.run(Batch(tokens=tokens, labels={LABEL: targets}))
    alpha, force = keep.finalize()  # [batch, layer, head, q, k]
    return ind.finalize(), alpha, force, keep.valid, loss


def _interval(prev: tuple, cur: tuple, targets: torch.Tensor, valid: torch.Tensor) -> np.ndarray:
    """Per [layer, head]: r_force, r_pred, sign_agree, target_gain, gain_share_target."""
    a0, f0 = prev
    a1 = cur[0]
    da = a1 - a0
    pred = a0 * (f0 - (a0 * f0).sum(-1, keepdim=True))
    bi, qi = torch.nonzero(targets >= 0, as_tuple=True)
    kj = targets[bi, qi]
    n_l, n_h = a0.shape[1], a0.shape[2]
    out = np.full((n_l, n_h, 5), np.nan)
    m = valid[:, None, None].expand_as(da)
    for L in range(n_l):
        for h in range(n_h):
            sel = m[:, L, h]
            x, y, p = f0[:, L, h][sel], da[:, L, h][sel], pred[:, L, h][sel]
            nz = x != 0
            agree = float((y.abs() * ((torch.sign(x) == torch.sign(y)) & nz)).sum() / (y.abs() * nz).sum().clamp_min(1e-300))
            rows = da[bi, L, h, qi]  # [n, key]
            tg = rows[torch.arange(len(bi)), kj]
            gain = float(tg.clamp(min=0).sum() / rows.clamp(min=0).sum().clamp_min(1e-300))
            out[L, h] = [pearson(x.numpy(), y.numpy()), pearson(p.numpy(), y.numpy()), agree, float(tg.mean()), gain]
    return out


_SNAP_COLS = ("score", "prev_token", "force_share_target", "mean_force_target", "frac_force_positive")
_INT_COLS = ("r_force", "r_pred", "sign_agree", "target_gain", "gain_share_target")


@dataclass(frozen=True, eq=False)
class InductionDynamics:
    """Snapshot rows (step, probe, layer, head, the :data:`_SNAP_COLS`), interval rows (step,
    next_step, probe, layer, head, phase, force_target, the :data:`_INT_COLS`), the phase change,
    losses per snapshot and probe, and the frame–precision summary of the replay."""

    checkpoint: str
    steps: list[int]
    snapshots: list[dict[str, Any]]
    intervals: list[dict[str, Any]]
    induction_head: tuple[int, int]
    rise_start: int | None
    rise_end: int | None
    losses: dict[str, list[float]]
    heldout_loss: dict[int, float]
    dynamics: dict[str, Any] = field(default_factory=dict)

    def to_dataframe(self, which: str = "intervals"):
        import pandas as pd

        return pd.DataFrame(self.snapshots if which == "snapshots" else self.intervals)

    def to_dict(self) -> dict[str, Any]:
        return {"checkpoint": self.checkpoint, "steps": self.steps, "induction_head": list(self.induction_head),
                "rise_start": self.rise_start, "rise_end": self.rise_end, "losses": self.losses,
                "heldout_loss": {str(k): v for k, v in self.heldout_loss.items()}, "dynamics": self.dynamics,
                "phase_summary": self.phase_summary(), "snapshots": self.snapshots, "intervals": self.intervals}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "InductionDynamics":
        """Inverse of :meth:`to_dict` (e.g. a recorded ``induction_dynamics.json``)."""
        return cls(checkpoint=d["checkpoint"], steps=list(d["steps"]), snapshots=list(d["snapshots"]),
                   intervals=list(d["intervals"]), induction_head=tuple(d["induction_head"]),
                   rise_start=d["rise_start"], rise_end=d["rise_end"], losses=dict(d["losses"]),
                   heldout_loss={int(k): float(v) for k, v in d["heldout_loss"].items()}, dynamics=dict(d.get("dynamics", {})))

    def phase_summary(self) -> list[dict[str, Any]]:
        """Mean interval metrics per probe, phase and group (the induction head vs the other heads)."""
        df = self.to_dataframe()
        if df.empty:
            return []
        df = df.assign(group=np.where((df.layer == self.induction_head[0]) & (df["head"] == self.induction_head[1]), "induction head", "other heads"))
        g = df.groupby(["probe", "phase", "group"])[["force_target", *_INT_COLS]].mean().reset_index()
        g["n_intervals"] = df.groupby(["probe", "phase", "group"]).size().values
        return [{k: (v if isinstance(v, str) else float(v)) for k, v in r.items()} for r in g.to_dict("records")]

    def lead(self, probe: str = "code") -> list[dict[str, Any]]:
        """Per snapshot, for the induction head: the share of targets with A > 0 (the force pushes
        toward the target), the share of the positive force on the target key, and the attention
        on it (the induction score): does the force point at the target before attention moves?"""
        L, H = self.induction_head
        return [{"step": r["step"], "targets_A_positive": r["frac_force_positive"],
                 "force_share_target": r["force_share_target"], "alpha_on_target": r["score"]}
                for r in self.snapshots if r["probe"] == probe and (r["layer"], r["head"]) == (L, H)]

    def plot_lead(self, ax=None):
        """:meth:`lead` on both probes over training (log step axis), the phase change shaded."""
        import matplotlib.pyplot as plt

        if ax is None:
            _, ax = plt.subplots(figsize=(6, 3.6))
        for probe, ls in (("repeated", "-"), ("code", "--")):
            rows = [r for r in self.lead(probe) if r["step"] > 0]
            st = [r["step"] for r in rows]
            ax.plot(st, [r["force_share_target"] for r in rows], "o" + ls, ms=3, color="C3", label=f"{probe}: force share on target")
            ax.plot(st, [r["alpha_on_target"] for r in rows], "s" + ls, ms=3, color="C0", label=f"{probe}: α on target")
            ax.plot(st, [r["targets_A_positive"] - 0.5 for r in rows], "^" + ls, ms=3, color="C2", alpha=0.7,
                    label=f"{probe}: (targets with A>0) − ½")
        if self.rise_start is not None:
            ax.axvspan(self.rise_start, self.rise_end, color="gold", alpha=0.25)
        ax.set_xscale("log")
        ax.set_xlabel("training step t")
        ax.set_title("L{}H{}: where the force points at t".format(*self.induction_head), fontsize=9)
        ax.legend(fontsize=6)
        return ax

    def plot(self, ax=None, probe: str = "repeated"):
        """Induction score per head over training (log step axis), the phase change shaded."""
        import matplotlib.pyplot as plt

        if ax is None:
            _, ax = plt.subplots(figsize=(6, 3.6))
        df = self.to_dataframe("snapshots")
        df = df[(df.probe == probe) & (df.step > 0)]
        for (L, h), d in df.groupby(["layer", "head"]):
            ax.plot(d.step, d.score, "o-" if (L, h) == self.induction_head else ".-", ms=3, lw=1.6 if L else 0.8,
                    label=f"L{L}H{h}", color=f"C{L * 4 + h}")
        if self.rise_start is not None and self.rise_end is not None:
            ax.axvspan(self.rise_start, self.rise_end, color="gold", alpha=0.25, label="phase change")
        ax.set_xscale("log")
        ax.set_xlabel("training step")
        ax.set_ylabel("induction score (α on target)")
        ax.set_title(f"{self.checkpoint}: induction score on {probe} probe", fontsize=9)
        ax.legend(fontsize=6, ncol=2)
        return ax


def _rise(steps: list[int], series: np.ndarray) -> tuple[int | None, int | None]:
    lo, hi = float(series[0]), float(np.max(series))
    if hi - lo < 0.05:
        return None, None
    start = next(s for s, v in zip(steps, series) if v > lo + 0.1 * (hi - lo))
    end = next(s for s, v in zip(steps, series) if v > lo + 0.9 * (hi - lo))
    return start, end


def induction_dynamics(checkpoint: str, *, n_seqs: int = 16, half: int = 48, seed: int = 0, replay_dynamics: bool = True) -> InductionDynamics:
    """Measure every snapshot of ``checkpoint`` on the two probes (see the module doc)."""
    from ..models.snapshots import load_snapshot

    model, task, cfg, history = load_checkpoint(checkpoint)
    snaps = [s for s, _ in list_snapshots(checkpoint)]
    pr = probes(task, model, n_seqs=n_seqs, half=half, seed=seed)
    snap_rows, int_rows, losses = [], [], {k: [] for k in pr}
    prev: dict[str, tuple] = {}
    for step in snaps:
        m = load_snapshot(checkpoint, step)
        for name, (toks, tg) in pr.items():
            ind, alpha, force, valid, loss = _measure(m, toks, tg)
            losses[name].append(float(loss))
            for k, (L, h) in enumerate(ind.heads):
                snap_rows.append({"step": step, "probe": name, "layer": L, "head": h,
                                  **{c: float(getattr(ind, c)[k]) for c in _SNAP_COLS}})
            if name in prev:
                s0, a0, f0, res0 = prev[name]
                stats = _interval((a0, f0), (alpha, force), tg, valid)
                for k, (L, h) in enumerate(res0.heads):
                    int_rows.append({"step": s0, "next_step": step, "probe": name, "layer": L, "head": h,
                                     "force_target": float(res0.mean_force_target[k]),
                                     **dict(zip(_INT_COLS, map(float, stats[L, h])))})
            prev[name] = (step, alpha, force, ind)
    final = [r for r in snap_rows if r["step"] == snaps[-1] and r["probe"] == "repeated"]
    best = max(final, key=lambda r: r["score"])
    head = (best["layer"], best["head"])
    series = np.array([r["score"] for r in snap_rows if r["probe"] == "repeated" and (r["layer"], r["head"]) == head])
    start, end = _rise(snaps, series)
    for r in int_rows:
        r["phase"] = ("unknown" if start is None else "before" if r["next_step"] < start
                      else "after" if r["step"] >= end else "during")
    dyn: dict[str, Any] = {}
    if replay_dynamics:
        from ..analyses.monitor import replay

        dres = replay(resolve_checkpoint(checkpoint) / "snapshots", model, probe_tokens=pr["code"][0], every=1)
        dyn = {**dres.summary(), "steps": dres.steps.tolist(),
               "frame_distance_to_final": dres.frame_distance_to_final.tolist(),
               "value_distance_to_final": dres.value_distance_to_final.tolist()}
    held = {int(e["step"]): float(e["heldout_loss"]) for e in history.get("eval", []) if "heldout_loss" in e}
    return InductionDynamics(checkpoint=str(checkpoint), steps=snaps, snapshots=snap_rows, intervals=int_rows,
                             induction_head=head, rise_start=start, rise_end=end, losses=losses,
                             heldout_loss=held, dynamics=dyn)


def write_outputs(res: InductionDynamics, out: str | Path) -> dict[str, str]:
    """Figures (PNG) and ``induction_dynamics.json`` in ``out``; returns their paths by name."""
    from matplotlib.figure import Figure

    out = ensure_dir(out)
    paths = {}
    df_i = res.to_dataframe()
    L, H = res.induction_head

    fig = Figure(figsize=(11, 3.6))
    ax1, ax2 = fig.subplots(1, 2)
    res.plot(ax1, "repeated")
    res.plot(ax2, "code")
    ax2.set_ylabel("induction score (α on 3-gram target)")
    if res.heldout_loss:
        tw = ax1.twinx()
        ks = sorted(res.heldout_loss)
        tw.plot(ks, [res.heldout_loss[k] for k in ks], color="k", lw=0.8, alpha=0.6)
        tw.set_ylabel("held-out loss (nats/token)", fontsize=8)
    fig.tight_layout()
    paths["scores"] = str(out / "induction_scores.png")
    fig.savefig(paths["scores"], dpi=130)

    fig = Figure(figsize=(11, 3.8))
    axs = fig.subplots(1, 3)
    res.plot_lead(axs[0])
    for probe, ls in (("repeated", "-"), ("code", "--")):
        di = df_i[(df_i.probe == probe) & (df_i.layer == L) & (df_i["head"] == H) & (df_i.step > 0)]
        axs[1].plot(di.step, di.r_pred, "o" + ls, ms=3, label=f"{probe}: r(one-step forecast, Δα)")
        axs[1].plot(di.step, di.r_force, "^" + ls, ms=3, label=f"{probe}: r(force, Δα)")
        axs[1].plot(di.step, di.gain_share_target, "s" + ls, ms=3, alpha=0.6, label=f"{probe}: gain share on target")
    axs[1].set_xscale("log")
    axs[1].set_xlabel("training step t")
    if res.rise_start is not None:
        axs[1].axvspan(res.rise_start, res.rise_end, color="gold", alpha=0.25)
    axs[1].legend(fontsize=6)
    axs[1].set_title(f"L{L}H{H}: does it predict Δα (t → t+1)?", fontsize=9)
    d = df_i[(df_i.probe == "repeated") & (df_i.step > 0)]
    colors = {"before": "C0", "during": "C3", "after": "C2", "unknown": "C7"}
    for ph, dd in d.groupby("phase"):
        axs[2].scatter(dd.force_target, dd.target_gain, s=10, color=colors.get(ph, "C7"), label=ph)
    axs[2].axhline(0, color="gray", lw=0.5)
    axs[2].axvline(0, color="gray", lw=0.5)
    axs[2].set_xscale("symlog", linthresh=1e-6)
    axs[2].set_xlabel("mean force on target at t (all heads)")
    axs[2].set_ylabel("mean Δα on target, t → t+1")
    axs[2].legend(fontsize=7)
    fig.tight_layout()
    paths["routing"] = str(out / "induction_routing.png")
    fig.savefig(paths["routing"], dpi=130)

    if res.dynamics:
        fig = Figure(figsize=(6, 3.6))
        ax = fig.subplots()
        st = np.asarray(res.dynamics["steps"])
        for key, label, c in (("frame_distance_to_final", "frame: JS distance of patterns to final", "C0"),
                              ("value_distance_to_final", "precision: ‖v − v_final‖/‖v_final‖", "C3")):
            y = np.asarray(res.dynamics[key], dtype=float)
            ok = (st > 0) & np.isfinite(y)
            ax.plot(st[ok], y[ok] / np.nanmax(y[ok]), "o-", ms=3, color=c, label=label)
        for key, c in (("frame_settling_step", "C0"), ("precision_settling_step", "C3")):
            if res.dynamics.get(key):
                ax.axvline(res.dynamics[key], color=c, ls="--", lw=1)
        ax.set_xscale("log")
        ax.set_xlabel("training step")
        ax.set_ylabel("distance to final / max")
        ax.set_title("frame vs precision on held-out code", fontsize=9)
        ax.legend(fontsize=7)
        fig.tight_layout()
        paths["timescales"] = str(out / "frame_precision.png")
        fig.savefig(paths["timescales"], dpi=130)

    paths["json"] = str(out / "induction_dynamics.json")
    atomic_write_json(paths["json"], json.loads(json.dumps(res.to_dict(), default=float)))
    return paths
