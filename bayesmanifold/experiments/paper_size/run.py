"""Train a paper-size wind-tunnel model within a time budget, then measure every claim with both protocols.

:func:`run_paper_size` (the ``bayesmanifold paper-size run`` command):

1. measures the step time of the model on the device (a throw-away copy, a few steps) and plans
   ``min(steps, time_budget_s / step time)`` steps;
2. trains with :func:`bayesmanifold.models.training.train` (bf16 autocast on CUDA when asked:
   matmuls in bf16, the loss's log-softmax and the optimiser in float32), saving fp16 snapshots
   every 100 steps to 1,000, then log-spaced;
3. builds the report on the finished checkpoint (:func:`bayesmanifold.report.build_report`, in
   float32): gradient laws, calibration, the geometry suite, the authors' protocols, the
   dynamics replayed from the snapshots, and the claims table with both protocols;
4. shrinks the checkpoint for the trip back (fp16 weights; snapshots dropped unless kept) and
   writes ``paper_size.json``: the plan, the timings, the claims and the protocol numbers.
"""

import contextlib
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ...errors import ConfigError
from .config import PaperRunConfig, snapshot_schedule

__all__ = ["PaperRunResult", "measure_step_time", "run_paper_size"]

RESULT_FILE = "paper_size.json"


@dataclass(frozen=True)
class PaperRunResult:
    """What a paper-size run produced.

    Attributes:
        out: the output directory (``checkpoint/``, ``report/``, ``paper_size.json``).
        numbers: the contents of ``paper_size.json``.
    """

    out: Path
    numbers: dict

    def to_dict(self) -> dict[str, Any]:
        return dict(self.numbers)

    def to_dataframe(self):
        """One row per claim: paper, authors' protocol, ours, held."""
        import pandas as pd

        cols = ["claim", "paper", "authors_measured", "authors_held", "measured", "held"]
        return pd.DataFrame([{k: c.get(k) for k in cols} for c in self.numbers.get("claims", [])], columns=cols)

    def plot(self, ax=None):
        """Calibration MAE during training (log scale)."""
        import matplotlib.pyplot as plt

        if ax is None:
            _, ax = plt.subplots(figsize=(5, 3.2))
        ev = self.numbers.get("eval", [])
        ax.semilogy([e["step"] for e in ev], [e["entropy_mae_bits"] for e in ev], "o-")
        ax.set_xlabel("step")
        ax.set_ylabel("entropy MAE (bits)")
        ax.set_title(f"{self.numbers['config']['preset']}: {self.numbers['plan']['steps']} steps", fontsize=9)
        return ax


def _autocast(device: torch.device, bf16: bool):
    if bf16 and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_step_time(task: Any, spec: Any, batch_size: int, *, device: str = "cpu", bf16: bool = False,
                      n_steps: int = 10, warmup_steps: int = 3, loss: str = "hard", seed: int = 0) -> float:
    """Seconds per optimiser step (forward, backward, clip, AdamW) of a throw-away model of ``spec``."""
    from ...models.presets import build_model
    from ...models.training import batch_loss

    dev = torch.device(device)
    model = build_model(spec, seed=seed, device=str(dev)).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    g = torch.Generator().manual_seed(seed)
    batches = [task.sample(batch_size, g).to(dev) for _ in range(min(n_steps + warmup_steps, 4))]
    t0 = 0.0
    for i in range(n_steps + warmup_steps):
        if i == warmup_steps:
            _sync(dev)
            t0 = time.perf_counter()
        with _autocast(dev, bf16):
            lo = batch_loss(model, batches[i % len(batches)], loss)
        opt.zero_grad(set_to_none=True)
        lo.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
    _sync(dev)
    return (time.perf_counter() - t0) / n_steps


def _plan(config: PaperRunConfig, sched: dict, step_time: float) -> dict[str, Any]:
    steps = sched["steps"]
    if config.time_budget_s is not None:
        steps = max(1, min(steps, int(config.time_budget_s / max(step_time, 1e-9))))
    warmup = min(sched["warmup"], max(1, steps // 10))
    return {"steps": steps, "paper_steps": sched["steps"], "warmup": warmup, "batch_size": sched["batch_size"],
            "lr": sched["lr"], "loss": sched["loss"], "step_time_s": step_time,
            "snapshots": list(snapshot_schedule(steps, dense_every=config.dense_every, dense_until=config.dense_until,
                                                n_log=config.n_log_snapshots))}


def _shrink(run_dir: Path, keep_snapshots: bool) -> None:
    """fp16 weights in ``model.pt`` (loaded back as float32); snapshots removed unless kept."""
    f = run_dir / "model.pt"
    sd = torch.load(f, map_location="cpu", weights_only=True)
    torch.save({k: (v.half() if v.is_floating_point() else v) for k, v in sd.items()}, f)
    if not keep_snapshots:
        shutil.rmtree(run_dir / "snapshots", ignore_errors=True)


def run_paper_size(config: PaperRunConfig, out: str | Path, *, progress: bool = False) -> PaperRunResult:
    """Train ``config``'s model into ``out/checkpoint``, report into ``out/report``, write ``out/paper_size.json``.

    Example:
        >>> res = run_paper_size(PaperRunConfig(device="cuda"), "paper_run")  # doctest: +SKIP
        >>> res.to_dataframe()  # doctest: +SKIP
    """
    from ...io import atomic_write_json
    from ...models.presets import preset_spec
    from ...models.training import TrainConfig, train
    from ...report.build import ReportConfig, build_report
    from ...windtunnels.registry import task_from_dict

    dev = torch.device(config.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {config.device!r} asked for, but CUDA is not available here")
    out = Path(out)
    run_dir = out / "checkpoint"
    if run_dir.exists() and any(run_dir.iterdir()):
        raise ConfigError(f"{str(run_dir)!r} is not empty: choose a new --out")
    sched = config.schedule()
    task = task_from_dict({"task": sched["task"]})
    spec = preset_spec(config.preset, task)
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    t_start = time.perf_counter()
    step_time = measure_step_time(task, spec, sched["batch_size"], device=str(dev), bf16=config.bf16,
                                  loss=sched["loss"], seed=config.seed)
    plan = _plan(config, sched, step_time)
    tc = TrainConfig(steps=plan["steps"], batch_size=plan["batch_size"], lr=plan["lr"], warmup_steps=plan["warmup"],
                     loss=plan["loss"], seed=config.seed, eval_every=min(config.eval_every, plan["steps"]),
                     n_eval=config.n_eval, checkpoint_every=max(1000, plan["steps"] // 10),
                     snapshot_steps=tuple(plan["snapshots"]), progress=progress)
    command = f"bayesmanifold paper-size run --preset {config.preset} --steps {plan['steps']} --seed {config.seed}"
    t0 = time.perf_counter()
    with _autocast(dev, config.bf16):
        res = train(task, spec, tc, out_dir=run_dir, preset=config.preset, command=command, device=str(dev))
    train_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    _, summary = build_report(ReportConfig(target=str(run_dir), out=str(out / "report"), device=str(dev),
                                           quick=config.quick_report, progress=progress))
    report_s = time.perf_counter() - t0
    _shrink(run_dir, config.keep_snapshots)
    numbers = {
        "config": config.to_dict(),
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
        "plan": plan,
        "timings_s": {"step_time_probe": plan["step_time_s"], "train": train_s, "report": report_s,
                      "total": time.perf_counter() - t_start, "report_stages": summary.get("stage_seconds", {})},
        "eval": res.history.get("eval", []),
        "claims": summary.get("claims", []),
        "calibration": summary.get("calibration"),
        "protocols": summary.get("protocols"),
        "analyze": summary.get("analyze"),
    }
    atomic_write_json(out / RESULT_FILE, json.loads(json.dumps(numbers, default=str)))
    return PaperRunResult(out, numbers)
