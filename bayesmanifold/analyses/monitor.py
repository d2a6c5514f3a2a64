"""A training callback recording the frame (attention) and precision (values) on a fixed probe.

:class:`DynamicsMonitor` (``on_step(model, step)``) records, on a fixed probe batch every
``every`` steps, per layer and head (Paper II, arXiv 2512.22473; the reading of the series, and
the stabilisation and settling rules, are in :mod:`bayesmanifold.analyses.dynamics`):

- attention drift: mean Jensen–Shannon *distance* √JSD (JSD in nats) between the pattern rows at
  this and the previous checkpoint (at the selected query positions). The distance, not the
  divergence: JSD is quadratic in small changes while the value drift is linear, and comparing a
  quadratic with a linear drift would make the frame look stable too early;
- value drift: ‖v_t − v_prev‖ / ‖v_prev‖ per kv head (all valid key positions);
- routing- and value-gradient norms ‖∂L/∂s‖ and ‖∂L/∂v‖;
- frame metrics: key orthogonality (hypothesis-token keys if ``key_token_ids`` is given, else the
  W_K-column definition) and attention entropy per layer;
- precision metrics: ``calibration_fn(model)`` (e.g. entropy-calibration MAE on a wind tunnel) and
  the value-manifold PC1 share (standardised concatenated values of ``value_layer``).

Each checkpoint is one pass of :func:`bayesmanifold.hooks.capture` over the probe: patterns,
values and (with ``gradients=True``) the gradient norms come from the same forward pass
(forward-only when ``gradients=False``). With ``keep_history=True`` the monitor keeps the probe's
patterns and values (float16) for the distance-to-final (settling) series.
"""

import copy
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from jaxtyping import Int
from torch import Tensor

from ..backends import ModelLike, model_access
from ..backends.batch import Positions, position_mask
from ..errors import CheckpointError, ConfigError, InputError
from ..hooks import capture
from .dynamics import DynamicsResult
from .keys import key_orthogonality
from .manifold import ManifoldAccumulator
from .stats import entropy, js_divergence

__all__ = ["DynamicsMonitor"]


class _Snapshot:
    """Capture accumulator: every layer's pattern and values (all heads, CPU float32) and, with
    gradients, ‖∂L/∂s‖ per query head and ‖∂L/∂v‖ per kv head."""

    sites = ("v",)

    def __init__(self, gradients: bool, n_layers: int, n_heads: int, n_kv: int) -> None:
        self.needs_gradients = gradients
        self.patterns: dict[int, Tensor] = {}
        self.values: dict[int, Tensor] = {}
        self.s = np.zeros((n_layers, n_heads))
        self.v = np.zeros((n_layers, n_kv))

    def update(self, bundle: Any) -> None:
        layer = bundle.layer
        self.patterns[layer] = bundle.pattern.to("cpu", torch.float32)
        self.values[layer] = bundle.acts["v"].to("cpu", torch.float32)  # b k kv d (unexpanded)
        if self.needs_gradients:
            gs = bundle.grad_scores.detach().double()
            for j, h in enumerate(bundle.heads):
                self.s[layer, h] += float((gs[:, j] ** 2).sum())
            gv = bundle.grad_values.detach().double()
            self.v[layer] += (gv**2).sum((0, 1, 3)).cpu().numpy()

    def merge(self, other: "_Snapshot") -> "_Snapshot":
        """Combine snapshots of disjoint layers (one probe pass is one snapshot)."""
        self.patterns.update(other.patterns)
        self.values.update(other.values)
        self.s, self.v = self.s + other.s, self.v + other.v
        return self

    def finalize(self) -> tuple[np.ndarray, np.ndarray]:
        return np.sqrt(self.s), np.sqrt(self.v)


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


def _value_drift(a: Tensor, b: Tensor) -> Tensor:
    """‖a − b‖ / ‖b‖ per kv head of value rows ``[n, kv, d]`` (float64)."""
    a, b = a.double(), b.double()
    return (a - b).norm(dim=(0, 2)) / b.norm(dim=(0, 2)).clamp_min(1e-30)


def _js_distance(a: Tensor, b: Tensor) -> Tensor:
    """√JSD (nats) of pattern rows along the last dim."""
    return js_divergence(a, b).clamp_min(0).sqrt()


class DynamicsMonitor:
    """Training callback recording frame and precision dynamics on a fixed probe batch.

    Args:
        probe_tokens: Int[batch, pos] fixed probe inputs (keep it small: e.g. 32 sequences).
        every: record when ``step % every == 0``.
        attention_mask: optional padding mask of the probe.
        query_positions: where attention drift/entropy and value PCA are read ("all", "last",
            an int, list, Int[batch] or Bool[batch, pos]; see ``backends.batch.position_mask``).
        objective: ``fn(logits, tokens) -> scalar`` for the gradient norms (default next-token loss).
        key_token_ids: hypothesis tokens for the token-key orthogonality (else W_K columns).
        calibration_fn: ``fn(model) -> float`` precision metric (e.g. calibration MAE in bits).
        value_layer: layer whose concatenated values give the PC1 share.
        drift_fraction, early_window: stabilisation rule (``analyses.dynamics``).
        gradients: also record gradient norms (the checkpoint's pass then runs backward too).
        keep_history: keep the probe's patterns and values of every checkpoint (float16, CPU) for
            the distance-to-final (settling) series; memory grows with checkpoints × probe size.
        settle_tol: tolerance of the settling rule (``analyses.dynamics``).

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
        self.gradients = bool(gradients)
        self.keep_history = keep_history
        self.settle_tol = float(settle_tol)
        self._hist: list[tuple[list[Tensor], list[Tensor]]] = []
        self.records: list[_Record] = []
        self._prev_patterns: list[Tensor] | None = None
        self._prev_values: list[Tensor] | None = None

    # -- callback protocol
    def on_step(self, model: ModelLike, step: int) -> None:
        """Record if ``step % every == 0`` (call after the optimizer step)."""
        if int(step) % self.every == 0:
            self.record(model, int(step))

    def record(self, model: ModelLike, step: int) -> None:
        """Record one checkpoint now, whatever the step."""
        access = model_access(model)
        if self.records and step <= self.records[-1].step:
            raise InputError(f"steps must increase: got {step} after {self.records[-1].step}")
        was_training = model.training
        model.eval()
        try:
            self._record(model, access, step)
        finally:
            model.train(was_training)

    def _record(self, model: ModelLike, access: Any, step: int) -> None:
        L, H, KV = access.n_layers, access.n_heads, access.n_kv_heads
        vl = access.norm_layers(self.value_layer)[0]
        snap = _Snapshot(self.gradients, L, H, KV)
        with capture(model, accumulators=[snap], gradients=self.gradients, objective=self.objective) as cap:
            loss = cap.run(self.probe, attention_mask=self.attention_mask)
        loss = float(loss) if self.gradients else float("nan")
        B, P = self.probe.shape
        qmask = position_mask(self.query_positions, B, P, self.attention_mask)
        kmask = position_mask("all", B, P, self.attention_mask)
        pats = [snap.patterns[layer] for layer in range(L)]
        vals = [snap.values[layer] for layer in range(L)]
        ad = np.full((L, H), np.nan)
        vd = np.full((L, KV), np.nan)
        ent = np.zeros(L)
        for layer in range(L):
            rows = pats[layer].permute(0, 2, 1, 3)[qmask]  # n h k
            ent[layer] = float(entropy(rows).mean())
            if self._prev_patterns is not None:
                prev = self._prev_patterns[layer].permute(0, 2, 1, 3)[qmask]
                ad[layer] = _js_distance(rows, prev).mean(0).numpy()
                vd[layer] = _value_drift(vals[layer][kmask], self._prev_values[layer][kmask]).numpy()
        self._prev_patterns, self._prev_values = pats, vals
        if self.keep_history:
            self._hist.append(([p.permute(0, 2, 1, 3)[qmask].half() for p in pats], [v[kmask].half() for v in vals]))
        feats = vals[vl][qmask].flatten(1)  # value manifold PC1 share
        pc1 = float("nan")
        if feats.shape[0] >= 2:
            acc = ManifoldAccumulator(standardize=True, keep_samples=False)
            acc.update(feats)
            try:
                pc1 = acc.finalize().pc1_share
            except InputError:
                pc1 = float("nan")
        if self.key_token_ids is not None:
            ko = key_orthogonality(model, definition="tokens", token_ids=self.key_token_ids, random_init_baseline=False).per_layer
        else:
            ko = key_orthogonality(model, definition="columns", random_init_baseline=False).per_layer
        gs, gv = snap.finalize() if self.gradients else (np.full((L, H), np.nan), np.full((L, KV), np.nan))
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
            fd.append(float(np.mean([float(_js_distance(a.double(), b.double()).mean()) for a, b in zip(pats, fin_p)])))
            vd.append(float(np.mean([float(_value_drift(a, b).mean()) for a, b in zip(vals, fin_v)])))
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
    model: ModelLike,
    monitor: "DynamicsMonitor | None" = None,
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
    model_access(model)  # a hooked model, or ModelError before any file is read
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
        from .monitor import DynamicsMonitor

        monitor = DynamicsMonitor(**monitor_kwargs)
    work = copy.deepcopy(model)
    for step, path in snaps:
        try:
            sd = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # corrupt or foreign files raise many types
            raise CheckpointError(f"could not load snapshot {str(path)!r}: {type(exc).__name__}: {exc}") from None
        if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
            sd = sd["state_dict"]
        model_access(work).load_state_dict(sd, f"snapshot {str(path)!r}")
        monitor.record(work, step)
    del work
    return monitor.result()
