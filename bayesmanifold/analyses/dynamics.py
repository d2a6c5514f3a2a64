"""Two timescales during training: the frame (attention) settles early, precision (values) later.

Paper II (arXiv 2512.22473, PAPERS.md §2) predicts a frame–precision dissociation: the routing
gradient ∂L/∂s_ij = α_ij(b_ij − b̄_i) vanishes once a query's attention has concentrated, while the
value gradient Σ_i α_ij u_i persists, so attention patterns stabilise long before values stop
refining. The authors' note on the bijection model: the frame plateaus by step ~2,500 while
calibration improves ~40× over the next ~47.5k steps.

:class:`DynamicsMonitor` is a training callback (``on_step(model, step)``) that records, on a
fixed probe batch every ``every`` steps, per layer and head:

- attention drift: mean Jensen–Shannon *distance* √JSD (JSD in nats) between the pattern rows at
  this and the previous checkpoint (at the selected query positions). The distance, not the
  divergence: JSD is quadratic in small changes while the value drift is linear, and comparing a
  quadratic with a linear drift would make the frame look stable too early;
- value drift: ‖v_t − v_prev‖ / ‖v_prev‖ per kv head (all valid key positions);
- routing- and value-gradient norms ‖∂L/∂s‖ and ‖∂L/∂v‖ (via :func:`bayesmanifold.hooks.capture`);
- frame metrics: key orthogonality (hypothesis-token keys if ``key_token_ids`` is given, else the
  W_K-column definition) and attention entropy per layer;
- precision metrics: ``calibration_fn(model)`` (e.g. entropy-calibration MAE on a wind tunnel) and
  the value-manifold PC1 share (standardised concatenated values of ``value_layer``).

Stabilisation. Drifts are divided by the number of steps since the previous checkpoint (a rate,
so unevenly spaced snapshots compare). A series' *early level* is its peak rate (with
``early_window=k``: the maximum of its first k rates; the peak is the default because during a
learning-rate warm-up the very first rates are small). The series has stabilised at the first
checkpoint from which every later rate stays below ``drift_fraction`` × early level (default
0.1), for at least two checkpoints (below threshold only at the last checkpoint counts as not yet
stabilised). The frame series is the attention drift, the precision series the value drift (means
over layers and heads). The dissociation ratio is precision step / frame step (> 1: the frame
settles first). A decaying learning-rate schedule lowers both rates; the ratio is what compares.

Settling (a second, level-based reading, robust to the noise floor of Adam-like optimisers where
the drift *rate* never falls far): with ``keep_history=True`` the monitor keeps the probe's
patterns and values (float16) and measures each checkpoint's distance to the *latest* one, for the
frame (mean JS distance of the pattern rows) and for precision (‖v_t − v_T‖/‖v_T‖), and, if a
calibration function is given, |log c_t − log c_T|. A series has settled at the first checkpoint
from which it stays ≤ ``settle_tol`` (default 0.1) × its largest value, over at least two
checkpoints before the last (which is 0 by construction).

:func:`replay` feeds saved weight snapshots (``<checkpoint>/snapshots/step_XXXXXX.pt``) through a
monitor after training.
"""

import copy
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from jaxtyping import Int
from torch import Tensor

from ..errors import CheckpointError, ConfigError, InputError
from .geometry import key_orthogonality, pattern_entropy
from .manifold import (
    ManifoldAccumulator,
    Positions,
    _as_tokens,
    _forward_capture,
    _hook_model_check,
    _n_kv_heads,
    _norm_layer,
    _position_mask,
)

__all__ = ["DynamicsMonitor", "DynamicsResult", "replay", "stabilization_step", "settling_step", "js_divergence"]


def js_divergence(p: Tensor, q: Tensor) -> Tensor:
    """Jensen–Shannon divergence (nats) between distributions along the last dim; in [0, ln 2]."""
    p, q = p.double(), q.double()
    m = 0.5 * (p + q)

    def kl(a: Tensor, b: Tensor) -> Tensor:
        return torch.where(a > 0, a * (torch.log(a.clamp_min(1e-300)) - torch.log(b.clamp_min(1e-300))), torch.zeros_like(a)).sum(-1)

    return 0.5 * kl(p, m) + 0.5 * kl(q, m)


def stabilization_step(
    steps: Sequence[int], series: Sequence[float], *, fraction: float = 0.1, early_window: int | None = None, min_stable: int = 2
) -> int | None:
    """First step from which ``series`` stays below ``fraction`` × its early level (see module doc).

    The early level is the series' peak (``early_window=None``) or the maximum of its first
    ``early_window`` values. NaN entries (e.g. the first checkpoint, which has no predecessor) are
    skipped. Returns None if the series never stabilises, if the stable stretch at the end has
    fewer than ``min_stable`` checkpoints (a last point alone is no evidence: right-censored), or
    if there are fewer than 2 finite values (or fewer than ``early_window + 1``).
    """
    s = np.asarray(series, dtype=float)
    st = np.asarray(steps)
    ok = np.isfinite(s)
    s, st = s[ok], st[ok]
    if len(s) < (2 if early_window is None else early_window + 1):
        return None
    early = float(np.max(s if early_window is None else s[:early_window]))
    if early <= 0:
        return int(st[0])
    below = s < fraction * early
    # suffix-all: stable from index i if all below[i:]
    stable_from = None
    for i in range(len(s) - 1, -1, -1):
        if below[i]:
            stable_from = i
        else:
            break
    if stable_from is None or len(s) - stable_from < min_stable:
        return None
    return int(st[stable_from])


def settling_step(steps: Sequence[int], distance: Sequence[float], *, tol: float = 0.1, min_stable: int = 2) -> int | None:
    """First step from which a distance-to-final series stays ≤ ``tol`` × its maximum.

    The last checkpoint (distance 0 by construction) is left out; the stable stretch before it
    must hold at least ``min_stable`` checkpoints. NaNs are skipped.
    """
    d = np.asarray(distance, dtype=float)[:-1]
    st = np.asarray(steps)[:-1]
    ok = np.isfinite(d)
    d, st = d[ok], st[ok]
    if len(d) < min_stable + 1 or np.max(d) <= 0:
        return None
    below = d <= tol * np.max(d)
    i = len(d)
    while i > 0 and below[i - 1]:
        i -= 1
    return None if len(d) - i < min_stable else int(st[i])


class _GradNorms:
    """Capture accumulator: ‖∂L/∂s‖ per query head and ‖∂L/∂v‖ per kv head, per layer."""

    def __init__(self, n_layers: int, n_heads: int, n_kv: int) -> None:
        self.s = np.zeros((n_layers, n_heads))
        self.v = np.zeros((n_layers, n_kv))

    def update(self, bundle: Any) -> None:
        gs = bundle.grad_scores.detach().double()
        for j, h in enumerate(bundle.heads):
            self.s[bundle.layer, h] += float((gs[:, j] ** 2).sum())
        gv = bundle.grad_values.detach().double()
        self.v[bundle.layer] += (gv**2).sum((0, 1, 3)).cpu().numpy()

    def merge(self, other: "_GradNorms") -> "_GradNorms":
        self.s += other.s
        self.v += other.v
        return self

    def finalize(self) -> tuple[np.ndarray, np.ndarray]:
        return np.sqrt(self.s), np.sqrt(self.v)


@dataclass(frozen=True, eq=False)
class DynamicsResult:
    """The monitored series and the frame/precision stabilisation steps.

    Arrays are indexed [checkpoint, layer, head] (value drift and value-gradient norms by kv head).
    The first checkpoint's drifts are NaN (no predecessor).
    """

    steps: np.ndarray
    attention_drift: np.ndarray
    value_drift: np.ndarray
    grad_scores_norm: np.ndarray
    grad_values_norm: np.ndarray
    key_orthogonality: np.ndarray
    attention_entropy: np.ndarray
    value_pc1: np.ndarray
    loss: np.ndarray
    calibration: np.ndarray | None
    drift_fraction: float
    early_window: int | None
    frame_stabilization_step: int | None
    precision_stabilization_step: int | None
    key_definition: str = "columns"
    frame_distance_to_final: np.ndarray | None = None
    value_distance_to_final: np.ndarray | None = None
    settle_tol: float = 0.1

    @property
    def frame_settling_step(self) -> int | None:
        """First step from which the patterns stay within settle_tol of the final frame."""
        if self.frame_distance_to_final is None:
            return None
        return settling_step(self.steps, self.frame_distance_to_final, tol=self.settle_tol)

    @property
    def precision_settling_step(self) -> int | None:
        """Same for the values (relative distance to the final values)."""
        if self.value_distance_to_final is None:
            return None
        return settling_step(self.steps, self.value_distance_to_final, tol=self.settle_tol)

    @property
    def calibration_settling_step(self) -> int | None:
        """Same for log calibration error (|log c_t − log c_T|), if calibration was recorded."""
        if self.calibration is None or not np.all(self.calibration > 0):
            return None
        lc = np.log(self.calibration)
        return settling_step(self.steps, np.abs(lc - lc[-1]), tol=self.settle_tol)

    @property
    def settling_ratio(self) -> float | None:
        """precision (calibration if recorded, else values) settling step / frame settling step."""
        f = self.frame_settling_step
        p = self.calibration_settling_step if self.calibration is not None else self.precision_settling_step
        if f is None or p is None:
            return None
        return float(p) / max(float(f), 1.0)

    @property
    def dissociation_ratio(self) -> float | None:
        """precision_stabilization_step / frame_stabilization_step (None if either is missing)."""
        f, p = self.frame_stabilization_step, self.precision_stabilization_step
        if f is None or p is None:
            return None
        return float(p) / max(float(f), 1.0)

    @staticmethod
    def _rate(steps: np.ndarray, drift: np.ndarray) -> np.ndarray:
        d = drift.reshape(len(steps), -1).mean(1) if drift.size else np.full(len(steps), np.nan)
        gaps = np.diff(steps, prepend=np.nan).astype(float)
        return d / gaps

    @property
    def frame_series(self) -> np.ndarray:
        """Attention drift per step (mean over layers and heads), one value per checkpoint."""
        return self._rate(self.steps, self.attention_drift)

    @property
    def precision_series(self) -> np.ndarray:
        """Value drift per step (mean over layers and kv heads), one value per checkpoint."""
        return self._rate(self.steps, self.value_drift)

    def summary(self) -> dict[str, Any]:
        return {
            "frame_stabilization_step": self.frame_stabilization_step,
            "precision_stabilization_step": self.precision_stabilization_step,
            "dissociation_ratio": self.dissociation_ratio,
            "drift_fraction": self.drift_fraction,
            "early_window": self.early_window,
            "n_checkpoints": int(len(self.steps)),
            "final_calibration": None if self.calibration is None else float(self.calibration[-1]),
            "final_value_pc1": float(self.value_pc1[-1]) if len(self.value_pc1) else None,
            "frame_settling_step": self.frame_settling_step,
            "precision_settling_step": self.precision_settling_step,
            "calibration_settling_step": self.calibration_settling_step,
            "settling_ratio": self.settling_ratio,
            "settle_tol": self.settle_tol,
        }

    def to_dataframe(self):
        """Tidy: one row per (step, metric, layer, head); layer/head −1 where not applicable."""
        import pandas as pd

        rows = []

        def add(name: str, arr: np.ndarray | None, dims: int) -> None:
            if arr is None:
                return
            for t, step in enumerate(self.steps):
                a = arr[t]
                if dims == 0:
                    rows.append({"step": int(step), "metric": name, "layer": -1, "head": -1, "value": float(a)})
                elif dims == 1:
                    for layer, x in enumerate(a):
                        rows.append({"step": int(step), "metric": name, "layer": layer, "head": -1, "value": float(x)})
                else:
                    for layer in range(a.shape[0]):
                        for h in range(a.shape[1]):
                            rows.append({"step": int(step), "metric": name, "layer": layer, "head": h, "value": float(a[layer, h])})

        add("attention_drift", self.attention_drift, 2)
        add("value_drift", self.value_drift, 2)
        add("grad_scores_norm", self.grad_scores_norm, 2)
        add("grad_values_norm", self.grad_values_norm, 2)
        add("key_orthogonality", self.key_orthogonality, 1)
        add("attention_entropy", self.attention_entropy, 1)
        add("value_pc1", self.value_pc1, 0)
        add("loss", self.loss, 0)
        add("calibration", self.calibration, 0)
        add("frame_distance_to_final", self.frame_distance_to_final, 0)
        add("value_distance_to_final", self.value_distance_to_final, 0)
        add("frame_drift_rate", self.frame_series, 0)
        add("precision_drift_rate", self.precision_series, 0)
        return pd.DataFrame(rows)

    def plot(self, ax=None):
        """Frame and precision drift rates (each over its early level) on one time axis."""
        import matplotlib.pyplot as plt

        if ax is None:
            _, ax = plt.subplots(figsize=(6, 3.8))
        for series, label, color, stab in (
            (self.frame_series, "frame: attention drift (JS distance)", "C0", self.frame_stabilization_step),
            (self.precision_series, "precision: value drift", "C3", self.precision_stabilization_step),
        ):
            ok = np.isfinite(series)
            if not ok.any():
                continue
            early = np.max(series[ok] if self.early_window is None else series[ok][: self.early_window])
            y = series / early if early > 0 else series
            ax.plot(self.steps[ok], y[ok], "o-", ms=3, color=color, label=label)
            if stab is not None:
                ax.axvline(stab, color=color, ls="--", lw=1)
        for dist, label, color, stab in (
            (self.frame_distance_to_final, "frame: distance to final", "C0", self.frame_settling_step),
            (self.value_distance_to_final, "precision: distance to final", "C3", self.precision_settling_step),
        ):
            if dist is None or not np.isfinite(dist).any() or np.nanmax(dist) <= 0:
                continue
            y = dist / np.nanmax(dist)
            ax.plot(self.steps[:-1], y[:-1], "--", lw=1, color=color, alpha=0.8, label=label)
            if stab is not None:
                ax.axvline(stab, color=color, ls=":", lw=1)
        ax.axhline(self.drift_fraction, color="gray", ls=":", lw=1, label=f"{self.drift_fraction:g} × early level")
        ax.set_yscale("log")
        ax.set_xlabel("training step")
        ax.set_ylabel("drift rate / peak;  distance / max")
        r = self.dissociation_ratio
        ax.set_title("frame–precision dissociation" + (f": precision/frame = {r:.1f}×" if r else ""), fontsize=9)
        if self.calibration is not None and np.isfinite(self.calibration).any():
            ax2 = ax.twinx()
            ax2.plot(self.steps, self.calibration, color="C2", lw=1, alpha=0.7, label="calibration")
            ax2.set_ylabel("calibration error", color="C2")
            ax2.set_yscale("log")
        ax.legend(fontsize=7, loc="lower left")
        return ax

    # JSON round trip (what a training loop stores)
    def to_state(self) -> dict[str, Any]:
        def arr(a: np.ndarray | None) -> Any:
            return None if a is None else np.where(np.isfinite(a), a, np.nan).tolist()

        return {
            "steps": self.steps.tolist(),
            "attention_drift": arr(self.attention_drift),
            "value_drift": arr(self.value_drift),
            "grad_scores_norm": arr(self.grad_scores_norm),
            "grad_values_norm": arr(self.grad_values_norm),
            "key_orthogonality": arr(self.key_orthogonality),
            "attention_entropy": arr(self.attention_entropy),
            "value_pc1": arr(self.value_pc1),
            "loss": arr(self.loss),
            "calibration": arr(self.calibration),
            "drift_fraction": self.drift_fraction,
            "early_window": self.early_window,
            "key_definition": self.key_definition,
            "frame_distance_to_final": arr(self.frame_distance_to_final),
            "value_distance_to_final": arr(self.value_distance_to_final),
            "settle_tol": self.settle_tol,
        }

    @classmethod
    def from_state(cls, state: dict[str, Any], *, drift_fraction: float | None = None, early_window: int | None = None) -> "DynamicsResult":
        """Rebuild from :meth:`DynamicsMonitor.state` / :meth:`to_state` (recomputes stabilisation)."""
        try:
            steps = np.asarray(state["steps"], dtype=np.int64)
            get = lambda k: np.asarray(state[k], dtype=float) if state.get(k) is not None else None  # noqa: E731
            fr = float(state.get("drift_fraction", 0.1) if drift_fraction is None else drift_fraction)
            ew = state.get("early_window") if early_window is None else early_window
            ew = None if ew is None else int(ew)
            ad, vd = get("attention_drift"), get("value_drift")
        except (KeyError, TypeError, ValueError) as exc:
            raise InputError(f"not a dynamics-monitor state: {exc}") from None
        frame = cls._rate(steps, ad)
        prec = cls._rate(steps, vd)
        return cls(
            steps=steps,
            attention_drift=ad,
            value_drift=vd,
            grad_scores_norm=get("grad_scores_norm"),
            grad_values_norm=get("grad_values_norm"),
            key_orthogonality=get("key_orthogonality"),
            attention_entropy=get("attention_entropy"),
            value_pc1=get("value_pc1"),
            loss=get("loss"),
            calibration=get("calibration"),
            drift_fraction=fr,
            early_window=ew,
            frame_stabilization_step=stabilization_step(steps, frame, fraction=fr, early_window=ew),
            precision_stabilization_step=stabilization_step(steps, prec, fraction=fr, early_window=ew),
            key_definition=str(state.get("key_definition", "columns")),
            frame_distance_to_final=get("frame_distance_to_final"),
            value_distance_to_final=get("value_distance_to_final"),
            settle_tol=float(state.get("settle_tol", 0.1)),
        )


@dataclass
class _Record:
    step: int
    attention_drift: np.ndarray
    value_drift: np.ndarray
    grad_s: np.ndarray
    grad_v: np.ndarray
    key_orth: np.ndarray
    entropy: np.ndarray
    value_pc1: float
    loss: float
    calibration: float | None
    extra: dict = field(default_factory=dict)


class DynamicsMonitor:
    """Training callback recording frame and precision dynamics on a fixed probe batch.

    Args:
        probe_tokens: Int[batch, pos] fixed probe inputs (keep it small: e.g. 32 sequences).
        every: record when ``step % every == 0``.
        attention_mask: optional padding mask of the probe.
        query_positions: where attention drift/entropy and value PCA are read ("all", "last",
            an int, list, Int[batch] or Bool[batch, pos]; see manifold._position_mask).
        objective: ``fn(logits, tokens) -> scalar`` for the gradient norms (default next-token loss).
        key_token_ids: hypothesis tokens for the token-key orthogonality (else W_K columns).
        calibration_fn: ``fn(model) -> float`` precision metric (e.g. calibration MAE in bits).
        value_layer: layer whose concatenated values give the PC1 share.
        drift_fraction, early_window: stabilisation rule (module docstring).
        gradients: also record gradient norms via capture (one forward+backward per checkpoint).
        keep_history: keep the probe's patterns and values of every checkpoint (float16, CPU) for
            the distance-to-final (settling) series; memory grows with checkpoints × probe size.
        settle_tol: tolerance of the settling rule (module docstring).

    Example:
        >>> mon = DynamicsMonitor(probe, every=100, calibration_fn=lambda m: task.calibration(m))  # doctest: +SKIP
        >>> for step in range(n): ...; mon.on_step(model, step)  # doctest: +SKIP
        >>> res = mon.result(); res.plot()  # doctest: +SKIP
    """

    #: key under which a training loop stores :meth:`state` (``history["callbacks"][name]``)
    name = "dynamics"

    def __init__(
        self,
        probe_tokens: Int[Tensor, "batch pos"],
        *,
        every: int = 100,
        attention_mask: Tensor | None = None,
        query_positions: Positions = "all",
        objective: Callable[[Tensor, Tensor], Tensor] | None = None,
        key_token_ids: Sequence[int] | None = None,
        calibration_fn: Callable[[Any], float] | None = None,
        value_layer: int = -1,
        drift_fraction: float = 0.1,
        early_window: int | None = None,
        gradients: bool = True,
        keep_history: bool = True,
        settle_tol: float = 0.1,
    ) -> None:
        if int(every) < 1:
            raise ConfigError(f"every must be ≥ 1, got {every}")
        if not 0 < drift_fraction < 1:
            raise ConfigError(f"drift_fraction must lie in (0, 1), got {drift_fraction}")
        if early_window is not None and int(early_window) < 1:
            raise ConfigError(f"early_window must be ≥ 1 or None (the peak), got {early_window}")
        t = torch.as_tensor(probe_tokens)
        if t.dim() == 1:
            t = t[None]
        if t.dim() != 2 or t.dtype.is_floating_point:
            raise InputError(f"probe_tokens must be integer token ids [batch, pos], got {tuple(t.shape)} {t.dtype}")
        self.probe = t.long().cpu()
        self.every = int(every)
        self.attention_mask = attention_mask
        self.query_positions = query_positions
        self.objective = objective
        self.key_token_ids = None if key_token_ids is None else [int(x) for x in key_token_ids]
        self.calibration_fn = calibration_fn
        self.value_layer = value_layer
        self.drift_fraction = float(drift_fraction)
        self.early_window = None if early_window is None else int(early_window)
        self.gradients = gradients
        self.keep_history = keep_history
        self.settle_tol = float(settle_tol)
        self._hist: list[tuple[list[Tensor], list[Tensor]]] = []
        self.records: list[_Record] = []
        self._prev_patterns: list[Tensor] | None = None
        self._prev_values: list[Tensor] | None = None

    # -- callback protocol
    def on_step(self, model: Any, step: int) -> None:
        """Record if ``step % every == 0`` (call after the optimizer step)."""
        if int(step) % self.every == 0:
            self.record(model, int(step))

    def record(self, model: Any, step: int) -> None:
        """Record one checkpoint now, whatever the step."""
        _hook_model_check(model)
        if self.records and step <= self.records[-1].step:
            raise InputError(f"steps must increase: got {step} after {self.records[-1].step}")
        was_training = model.training
        model.eval()
        try:
            self._record(model, step)
        finally:
            model.train(was_training)

    def _record(self, model: Any, step: int) -> None:
        toks = _as_tokens(model, self.probe)
        L, H, KV = model.cfg.n_layers, model.cfg.n_heads, _n_kv_heads(model)
        names_p = [f"blocks.{layer}.attn.hook_pattern" for layer in range(L)]
        names_v = [f"blocks.{layer}.attn.hook_v" for layer in range(L)]
        store, _ = _forward_capture(model, toks, names_p + names_v, self.attention_mask)
        qmask = _position_mask(self.query_positions, toks.shape[0], toks.shape[1], self.attention_mask)
        kmask = _position_mask("all", toks.shape[0], toks.shape[1], self.attention_mask)
        pats = [store[n].to("cpu", torch.float32) for n in names_p]
        vals = [store[n].to("cpu", torch.float32) for n in names_v]
        ad = np.full((L, H), np.nan)
        vd = np.full((L, KV), np.nan)
        ent = np.zeros(L)
        for layer in range(L):
            rows = pats[layer].permute(0, 2, 1, 3)[qmask]  # n h k
            ent[layer] = float(pattern_entropy(rows).mean())
            if self._prev_patterns is not None:
                prev = self._prev_patterns[layer].permute(0, 2, 1, 3)[qmask]
                ad[layer] = js_divergence(rows, prev).clamp_min(0).sqrt().mean(0).numpy()
                v0, v1 = self._prev_values[layer][kmask].double(), vals[layer][kmask].double()  # n kv d
                vd[layer] = ((v1 - v0).norm(dim=(0, 2)) / v0.norm(dim=(0, 2)).clamp_min(1e-30)).numpy()
        self._prev_patterns, self._prev_values = pats, vals
        if self.keep_history:
            self._hist.append(
                (
                    [p.permute(0, 2, 1, 3)[qmask].half() for p in pats],
                    [v[kmask].half() for v in vals],
                )
            )
        # value manifold PC1 share
        vl = _norm_layer(model, self.value_layer)
        feats = vals[vl][qmask].flatten(1)
        pc1 = float("nan")
        if feats.shape[0] >= 2:
            acc = ManifoldAccumulator(standardize=True, keep_samples=False)
            acc.update(feats)
            try:
                pc1 = acc.finalize().pc1_share
            except InputError:
                pc1 = float("nan")
        # frame: key orthogonality
        if self.key_token_ids is not None:
            ko = key_orthogonality(model, definition="tokens", token_ids=self.key_token_ids, random_init_baseline=False).per_layer
        else:
            ko = key_orthogonality(model, definition="columns", random_init_baseline=False).per_layer
        # gradients
        gs, gv, loss = np.full((L, H), np.nan), np.full((L, KV), np.nan), float("nan")
        if self.gradients:
            from ..hooks import capture

            acc_g = _GradNorms(L, H, KV)
            with capture(model, accumulators=[acc_g], objective=self.objective) as cap:
                loss = cap.run(toks, attention_mask=self.attention_mask)
            gs, gv = acc_g.finalize()
        cal = None
        if self.calibration_fn is not None:
            with torch.no_grad():
                cal = float(self.calibration_fn(model))
        self.records.append(
            _Record(step=step, attention_drift=ad, value_drift=vd, grad_s=gs, grad_v=gv, key_orth=np.asarray(ko), entropy=ent, value_pc1=pc1, loss=loss, calibration=cal)
        )

    # -- results
    def result(self) -> DynamicsResult:
        """The series so far, with stabilisation steps."""
        if not self.records:
            raise InputError("the monitor has recorded nothing yet (no step was a multiple of `every`)")
        return DynamicsResult.from_state(self.state())

    def _distances_to_final(self) -> tuple[list[float], list[float]] | tuple[None, None]:
        if not self.keep_history or len(self._hist) != len(self.records) or not self._hist:
            return None, None
        fin_p, fin_v = self._hist[-1]
        fd, vd = [], []
        for pats, vals in self._hist:
            fd.append(float(np.mean([float(js_divergence(a.double(), b.double()).clamp_min(0).sqrt().mean()) for a, b in zip(pats, fin_p)])))
            vd.append(
                float(
                    np.mean(
                        [
                            float(((a.double() - b.double()).norm(dim=(0, 2)) / b.double().norm(dim=(0, 2)).clamp_min(1e-30)).mean())
                            for a, b in zip(vals, fin_v)
                        ]
                    )
                )
            )
        return fd, vd

    def state(self) -> dict[str, Any]:
        """JSON-able series (what a training loop stores beside its history)."""
        R = self.records
        fd, vd = self._distances_to_final()
        cal = [r.calibration for r in R]
        return {
            "steps": [r.step for r in R],
            "attention_drift": [r.attention_drift.tolist() for r in R],
            "value_drift": [r.value_drift.tolist() for r in R],
            "grad_scores_norm": [r.grad_s.tolist() for r in R],
            "grad_values_norm": [r.grad_v.tolist() for r in R],
            "key_orthogonality": [np.asarray(r.key_orth).tolist() for r in R],
            "attention_entropy": [r.entropy.tolist() for r in R],
            "value_pc1": [r.value_pc1 for r in R],
            "loss": [r.loss for r in R],
            "calibration": None if any(c is None for c in cal) else cal,
            "drift_fraction": self.drift_fraction,
            "early_window": self.early_window,
            "key_definition": "tokens" if self.key_token_ids is not None else "columns",
            "frame_distance_to_final": fd,
            "value_distance_to_final": vd,
            "settle_tol": self.settle_tol,
        }


_STEP_RE = re.compile(r"step_(\d+)\.pt$")


def _snapshot_list(snapshots: str | Path | Iterable[str | Path]) -> list[tuple[int, Path]]:
    if isinstance(snapshots, str | Path):
        p = Path(snapshots)
        if p.is_dir() and (p / "snapshots").is_dir():
            p = p / "snapshots"
        if not p.is_dir():
            raise CheckpointError(f"snapshot directory {str(p)!r} does not exist")
        files = list(p.glob("step_*.pt"))
    else:
        files = [Path(x) for x in snapshots]
    out = []
    for f in files:
        m = _STEP_RE.search(f.name)
        if not m:
            raise CheckpointError(f"snapshot file {str(f)!r} is not named step_XXXXXX.pt")
        if not f.is_file():
            raise CheckpointError(f"snapshot file {str(f)!r} does not exist")
        out.append((int(m.group(1)), f))
    if not out:
        raise CheckpointError(f"no step_XXXXXX.pt snapshots found in {str(snapshots)!r}")
    return sorted(out)


def replay(
    snapshots: str | Path | Iterable[str | Path],
    model: Any,
    monitor: DynamicsMonitor | None = None,
    *,
    max_snapshots: int | None = None,
    max_step: int | None = None,
    **monitor_kwargs: Any,
) -> DynamicsResult:
    """Load each weight snapshot into a copy of ``model`` and feed it to a monitor.

    Args:
        snapshots: a directory of ``step_XXXXXX.pt`` state_dicts (or a checkpoint directory with a
            ``snapshots/`` sub-directory), or a list of such files.
        model: a model of the snapshots' architecture (not modified: a deep copy is loaded).
        monitor: the monitor to feed; else one is built from ``monitor_kwargs`` (needs
            ``probe_tokens``).
        max_snapshots: use at most this many, evenly spaced (first and last kept).
        max_step: only snapshots up to this step (e.g. the end of a multi-stage run's first,
            from-scratch stage: a warm start with a fresh optimiser restarts the drifts).
    """
    _hook_model_check(model)
    snaps = _snapshot_list(snapshots)
    if max_step is not None:
        kept = [(st, f) for st, f in snaps if st <= max_step]
        if not kept:
            raise InputError(f"no snapshot at or before step {max_step}; the first is at step {snaps[0][0]}")
        snaps = kept
    if max_snapshots is not None and len(snaps) > max_snapshots:
        idx = np.unique(np.linspace(0, len(snaps) - 1, int(max_snapshots)).round().astype(int))
        snaps = [snaps[i] for i in idx]
    if monitor is None:
        if "probe_tokens" not in monitor_kwargs:
            raise InputError("replay needs a monitor or probe_tokens=... to build one")
        monitor = DynamicsMonitor(**monitor_kwargs)
    from ..models.checkpoint import load_fitting_state_dict

    work = copy.deepcopy(model)
    for step, path in snaps:
        try:
            sd = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # corrupt or foreign files raise many types
            raise CheckpointError(f"could not load snapshot {str(path)!r}: {type(exc).__name__}: {exc}") from None
        if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
            sd = sd["state_dict"]
        load_fitting_state_dict(work, sd, f"snapshot {str(path)!r}")
        monitor.record(work, step)
    del work
    return monitor.result()
