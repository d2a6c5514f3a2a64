"""One training loop for every architecture and wind tunnel (Paper I, arXiv 2512.22471, §3).

Fresh sequences are drawn from the task at every step with a seeded ``torch.Generator`` (the
hypothesis space is far too large to memorise). The loss is cross-entropy of the model's softmax
*restricted to the task's answer block* at the scored positions, against either the realised
answer (``loss="hard"``, the ordinary next-token loss of the bijection task) or the exact
posterior (``loss="soft"``, the HMM task's filtering-posterior target). AdamW, linear warm-up then
cosine decay, gradient-norm clipping; every ``eval_every`` steps the entropy-calibration MAE and
the mean KL(Bayes ‖ model) are measured on a fixed evaluation set and stored in the history.

Callbacks follow a plain protocol: ``on_step(model, step)`` is called after each optimiser
update (``step`` counts updates done, from 1; the parameters' ``.grad`` still hold that step's
clipped gradients), and an optional ``state()`` whose JSON-able return value is stored in the
history under ``history["callbacks"][name]`` at every evaluation and at the end.
"""

import math
import signal
import threading
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import CheckpointError, ConfigError
from ..windtunnels.base import TaskBatch, WindTunnel, make_generator
from ..windtunnels.calibration import measure_calibration
from . import checkpoint as ckpt
from . import snapshots
from .presets import ModelSpec, build_model, move_model

__all__ = ["TrainConfig", "TrainResult", "train", "batch_loss"]

_EVAL_SEED_OFFSET = 1_000_003


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """Training hyper-parameters.

    Attributes:
        steps: optimiser updates.
        batch_size: sequences per update.
        lr: peak learning rate; warmup_steps: linear warm-up length; min_lr_ratio: the cosine
            decays to ``lr * min_lr_ratio`` at ``steps``.
        weight_decay: AdamW weight decay; grad_clip: max global gradient norm (0 = off).
        loss: ``"hard"``, ``"soft"`` or ``None`` (the task's ``DEFAULT_LOSS``).
        seed: seeds the model initialisation and the training data stream.
        eval_every: steps between calibration evaluations; n_eval: evaluation sequences (a fixed
            set drawn from ``seed + 1000003``).
        checkpoint_every: steps between checkpoints (when an output directory is given).
        snapshot_steps: steps after which fp16 weight snapshots are saved (0 = the init).
        log_every: steps between recorded training losses.
        progress: show a tqdm progress bar.
    """

    steps: int = 1000
    batch_size: int = 64
    lr: float = 1e-3
    warmup_steps: int = 100
    min_lr_ratio: float = 0.02
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    loss: "str | None" = None
    seed: int = 0
    eval_every: int = 500
    n_eval: int = 256
    checkpoint_every: int = 500
    snapshot_steps: tuple = field(default_factory=tuple)
    log_every: int = 10
    progress: bool = True

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "eval_every", "n_eval", "checkpoint_every", "log_every"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"{name} must be a positive int; got {v!r}")
        if isinstance(self.warmup_steps, bool) or not isinstance(self.warmup_steps, int) or self.warmup_steps < 0:
            raise ConfigError(f"warmup_steps must be an int >= 0; got {self.warmup_steps!r}")
        if not (isinstance(self.lr, (int, float)) and self.lr > 0 and math.isfinite(self.lr)):
            raise ConfigError(f"lr must be a positive finite number; got {self.lr!r}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError(f"min_lr_ratio must be in [0, 1]; got {self.min_lr_ratio!r}")
        if self.weight_decay < 0 or self.grad_clip < 0:
            raise ConfigError("weight_decay and grad_clip must be >= 0")
        if self.loss not in (None, "hard", "soft"):
            raise ConfigError(f"loss must be 'hard', 'soft' or None; got {self.loss!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ConfigError(f"seed must be an int; got {self.seed!r}")
        snaps = tuple(sorted(set(int(s) for s in self.snapshot_steps)))
        if any(s < 0 or s > self.steps for s in snaps):
            raise ConfigError(f"snapshot_steps must lie in [0, steps={self.steps}]; got {snaps}")
        object.__setattr__(self, "snapshot_steps", snaps)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["snapshot_steps"] = list(self.snapshot_steps)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        names = {f.name for f in fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ConfigError(f"unknown TrainConfig fields {sorted(unknown)}; accepted {sorted(names)}")
        d = dict(d)
        if "snapshot_steps" in d:
            d["snapshot_steps"] = tuple(d["snapshot_steps"])
        return cls(**d)

    def lr_factor(self, step: int) -> float:
        """Multiplier of ``lr`` for update number ``step`` (0-based): warm-up then cosine."""
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        span = max(1, self.steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / span)
        return self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


@dataclass(frozen=True, eq=False)
class TrainResult:
    """The trained model and its history (``loss``: [[step, loss]], ``eval``: list of dicts)."""

    model: nn.Module
    history: dict
    out_dir: "Path | None" = None

    def to_dataframe(self):
        """One row per evaluation: step, entropy MAE, mean KL, train loss."""
        import pandas as pd

        return pd.DataFrame(self.history.get("eval", []))

    def plot(self, ax=None):
        """Entropy MAE over training (log scale)."""
        import matplotlib.pyplot as plt

        if ax is None:
            _, ax = plt.subplots(figsize=(5, 3.2))
        ev = self.history.get("eval", [])
        ax.plot([e["step"] for e in ev], [e["entropy_mae_bits"] for e in ev], "o-")
        ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_ylabel("entropy MAE (bits)")
        return ax


def batch_loss(model: nn.Module, batch: TaskBatch, loss: str) -> torch.Tensor:
    """Mean cross-entropy over scored positions of the answer-block-restricted softmax."""
    logits = model(batch.tokens)
    sel = logits[:, batch.positions][..., batch.answer_tokens]
    logp = torch.log_softmax(sel.float(), dim=-1)
    if loss == "hard":
        return -logp.gather(-1, batch.targets[..., None]).mean()
    return -(batch.posterior.to(logp.dtype) * logp).sum(-1).mean()


def _callback_states(callbacks, history: dict) -> None:
    for i, cb in enumerate(callbacks):
        state = getattr(cb, "state", None)
        if callable(state):
            name = getattr(cb, "name", None) or f"{type(cb).__name__}_{i}"
            history.setdefault("callbacks", {})[name] = state()


def train(
    task: WindTunnel,
    spec: ModelSpec,
    config: TrainConfig,
    *,
    model: "nn.Module | None" = None,
    out_dir: "str | Path | None" = None,
    callbacks: tuple = (),
    preset: "str | None" = None,
    command: "str | None" = None,
    device: "str | torch.device" = "cpu",
    init_from: "str | None" = None,
) -> TrainResult:
    """Train ``spec``'s model on ``task``; checkpoint to and resume from ``out_dir``.

    Args:
        task: the wind tunnel.
        spec: the architecture (see :func:`bayesmanifold.models.presets.preset_spec`).
        config: hyper-parameters.
        model: an already built model of ``spec`` (default: built from ``spec`` with
            ``config.seed``).
        out_dir: checkpoint directory. If it holds a partial run of the same configuration,
            training resumes exactly where it stopped (weights, optimiser, schedule, data RNG,
            step, history); a finished run is loaded and returned as is.
        callbacks: objects with ``on_step(model, step)`` (and optionally ``state()``).
        preset, command: recorded in the checkpoint's config.
        device: ``"cpu"``, ``"cuda"``...
        init_from: the checkpoint ``model``'s weights came from (a warm start). When it names a
            finished checkpoint (a directory or a shipped name), the run continues its lineage:
            its snapshots are carried over into ``out_dir``, this run's snapshots are numbered
            from the parent's cumulative step, and ``config.json`` records ``step_offset`` and
            ``lineage``. Any other string is only recorded.

    Returns:
        :class:`TrainResult` with the model and its history.

    Example:
        >>> task = BijectionTask(V=6, L=5)
        >>> res = train(task, preset_spec("tiny", task), TrainConfig(steps=20, progress=False))
    """
    for cb in callbacks:
        if not callable(getattr(cb, "on_step", None)):
            raise ConfigError(f"callback {cb!r} has no on_step(model, step) method")
    if spec.d_vocab < task.d_vocab or spec.n_ctx < task.seq_len:
        raise ConfigError(
            f"model (d_vocab={spec.d_vocab}, n_ctx={spec.n_ctx}) does not fit task "
            f"{task.NAME} (d_vocab={task.d_vocab}, seq_len={task.seq_len})"
        )
    device = torch.device(device)
    loss_kind = config.loss or task.DEFAULT_LOSS
    if model is None:
        model = build_model(spec, seed=config.seed)
    move_model(model, device)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, config.lr_factor)
    g = make_generator(config.seed)
    history: dict[str, Any] = {"loss": [], "eval": [], "callbacks": {}, "wall_time_s": 0.0}
    start = 0
    out = Path(out_dir) if out_dir is not None else None
    step_offset, lineage, parent = 0, [], None
    if init_from is not None:
        try:
            parent = ckpt.resolve_checkpoint(init_from)
        except CheckpointError:
            parent = None  # a label only: nothing to continue
        if parent is not None:
            step_offset, lineage = snapshots.parent_lineage(init_from)
    meta = dict(task=task, spec=spec, config=config, preset=preset, command=command,
                init_from=init_from, step_offset=step_offset, lineage=lineage)

    if out is not None:
        state = ckpt.read_train_state(out, expect=meta)
        if state is not None:
            model.load_state_dict(state["model"])
            opt.load_state_dict(state["optimizer"])
            sched.load_state_dict(state["scheduler"])
            g.set_state(state["data_rng"])
            history = state["history"]
            start = int(state["step"])
        elif ckpt.is_complete(out):
            ckpt.check_same_run(ckpt.read_config(out), meta, out)
            m, _, _, hist = ckpt.load_checkpoint(out, device=device)
            return TrainResult(m, hist, out)
        elif out.exists() and any(out.iterdir()):
            raise CheckpointError(
                f"output directory {str(out)!r} is not empty and holds no resumable run; "
                "choose an empty or new directory"
            )

    def eval_record(step: int, last_loss: float) -> None:
        if callable(getattr(task, "evaluate", None)):  # a task without exact posteriors (text)
            rec = task.evaluate(model, n=config.n_eval, device=device)
        else:
            res = measure_calibration(model, task, n_seqs=config.n_eval,
                                      generator=config.seed + _EVAL_SEED_OFFSET, device=device)
            rec = {"entropy_mae_bits": res.entropy_mae_bits, "mean_kl_bits": res.mean_kl_bits}
        history["eval"].append({
            "step": step,
            **rec,
            "train_loss": last_loss,
            "wall_time_s": history["wall_time_s"] + (time.perf_counter() - t0),
        })
        _callback_states(callbacks, history)

    def save(step: int, complete: bool) -> None:
        if out is None:
            return
        history_now = dict(history)
        history_now["wall_time_s"] = history["wall_time_s"] + (time.perf_counter() - t0)
        ckpt.save_checkpoint(out, model=model, step=step, history=history_now, complete=complete,
                             optimizer=opt, scheduler=sched, generator=g, **meta)

    snaps = set(config.snapshot_steps)
    t0 = time.perf_counter()
    if out is not None and start == 0:
        save(0, complete=False)  # first, so that a run killed while copying below resumes
        if parent is not None:
            snapshots.carry_snapshots(parent, out)  # skips the files already there
        if 0 in snaps:
            snapshots.save_snapshot(out, step_offset, model)

    from tqdm.auto import tqdm

    bar = tqdm(total=config.steps, initial=start, disable=not config.progress,
               desc=f"train {task.NAME}/{spec.arch}", dynamic_ncols=True)
    step = start
    last_loss = float("nan")
    # Ctrl-C / SIGTERM are deferred to the end of the step in progress, so that the checkpoint
    # written on interruption is a consistent state and the resumed run equals an uninterrupted one.
    pending: list[int] = []
    old_handlers = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            old_handlers[sig] = signal.signal(sig, lambda signum, frame: pending.append(signum))
    try:
        while step < config.steps:
            batch = task.sample(config.batch_size, g).to(device)
            loss = batch_loss(model, batch, loss_kind)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if config.grad_clip > 0:
                nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
            opt.step()
            sched.step()
            step += 1
            last_loss = float(loss.detach())
            if not math.isfinite(last_loss):
                raise ConfigError(f"training loss became {last_loss} at step {step}; lower lr")
            if step % config.log_every == 0:
                history["loss"].append([step, last_loss])
            if step in snaps and out is not None:
                snapshots.save_snapshot(out, step_offset + step, model)
            bar.update(1)
            if step % config.eval_every == 0 or step == config.steps:
                eval_record(step, last_loss)
                ev = history["eval"][-1]
                bar.set_postfix(loss=f"{last_loss:.4f}", **({"mae": f"{ev['entropy_mae_bits']:.4f}"} if "entropy_mae_bits" in ev
                                                            else {"heldout": f"{ev.get('heldout_loss', float('nan')):.4f}"}))
            for cb in callbacks:
                cb.on_step(model, step)
            if pending:
                raise KeyboardInterrupt
            if step % config.checkpoint_every == 0 and step < config.steps:
                save(step, complete=False)
    except KeyboardInterrupt:
        save(step, complete=False)
        raise
    finally:
        bar.close()
        for sig, h in old_handlers.items():
            signal.signal(sig, h)
    _callback_states(callbacks, history)
    history["wall_time_s"] = history["wall_time_s"] + (time.perf_counter() - t0)
    t0 = time.perf_counter()
    if out is not None:
        save(step, complete=True)
    model.eval()
    return TrainResult(model, history, out)
