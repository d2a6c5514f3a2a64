"""Two timescales during training: the frame (attention) settles early, precision (values) later.

Paper II (arXiv 2512.22473, PAPERS.md §2) predicts a frame–precision dissociation: the routing
gradient ∂L/∂s_ij = α_ij(b_ij − b̄_i) vanishes once a query's attention has concentrated, while the
value gradient Σ_i α_ij u_i persists, so attention patterns stabilise long before values stop
refining. The authors' note on the bijection model: the frame plateaus by step ~2,500 while
calibration improves ~40× over the next ~47.5k steps.

The series are recorded by :class:`bayesmanifold.analyses.monitor.DynamicsMonitor` (a training
callback) or by :func:`replay` of saved weight snapshots; this module holds their reading.

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
the drift *rate* never falls far): each checkpoint's distance to the *latest* one, for the frame
(mean JS distance of the pattern rows) and for precision (‖v_t − v_T‖/‖v_T‖), and, if a
calibration function was given, |log c_t − log c_T|. A series has settled at the first checkpoint
from which it stays ≤ ``settle_tol`` (default 0.1) × its largest value, over at least two
checkpoints before the last (which is 0 by construction). Both rules live in
:mod:`bayesmanifold.analyses.stats`.

:func:`replay` feeds saved weight snapshots (``<checkpoint>/snapshots/step_XXXXXX.pt``) through a
monitor after training.
"""

from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import InputError
from .stats import settling_step, stabilization_step

__all__ = ["DynamicsResult"]


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

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe: the series (:meth:`to_state`, NaN as float) and the :meth:`summary`."""
        return {**self.to_state(), **self.summary()}

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
