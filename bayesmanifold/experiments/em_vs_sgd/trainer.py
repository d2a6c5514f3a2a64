"""Training of many single-head runs as one batch: SGD, Adam and the closed-form M-step.

Every run (a method, a seed, its learning rates) is one row of a batch; the whole batch takes a
full-batch step at once through :func:`~.kernel.attention_forward_backward`. Per-row learning
rates give SGD and the EM-like schedule (10× lr on ``W_V``); rows of kind ``adam`` use Adam
(β = 0.9, 0.999, ε = 1e-8) and rows of kind ``mstep`` replace ``W_V`` by the least-squares
M-step (:func:`~.kernel.m_step_values`).
"""

import sys
import time
from collections.abc import Sequence
from dataclasses import astuple, dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ...windtunnels.sticky_chain import StickyChainData
from .kernel import attention_forward_backward, init_weights, m_step_values
from .worker import WorkerProcess

__all__ = ["RunSpec", "RunOut", "train_runs", "train_group", "evaluate_runs", "checkpoint_steps", "split_rows", "group_blocks"]


@dataclass(frozen=True)
class RunSpec:
    method: str
    seed: int
    data_key: tuple[int, bool]  # (sequence seed, literal stickiness)
    kind: str  # "sgd" | "adam" | "mstep"
    lrs: tuple[float, float, float, float]  # Q, K, V, O
    m_step: float = 0.0


@dataclass
class RunOut:
    curves: np.ndarray  # [B, steps + 1] loss before each update, then the final loss
    final_loss: np.ndarray
    entropy: np.ndarray
    accuracy: np.ndarray
    snapshots: dict[int, list[tuple[int, tuple[Tensor, ...]]]]
    wall_s: float
    model_steps: int
    weights: list[Tensor]  # final W_Q, W_K, W_V, W_O, each [B, ...]


def split_rows(n_rows: int, chunk: int) -> list[slice]:
    """``ceil(n_rows / chunk)`` near-equal contiguous blocks of rows, at least two when
    ``n_rows >= 2`` (so that two workers share even a small batch).

    The blocks depend only on ``n_rows`` and ``chunk``, never on the number of workers: a row's
    numbers can depend (in the last bits) on its block, and must not depend on the threads.
    """
    n = min(n_rows, max(-(-n_rows // chunk), 2))
    edges = [round(i * n_rows / n) for i in range(n + 1)]
    return [slice(a, b) for a, b in zip(edges[:-1], edges[1:])]


def group_blocks(blocks: list[slice], groups: int) -> list[list[slice]]:
    """Consecutive blocks in at most ``groups`` groups of near-equal row counts (none empty)."""
    n_rows = blocks[-1].stop
    groups = max(1, min(groups, len(blocks)))
    out: list[list[slice]] = [[] for _ in range(groups)]
    for sl in blocks:  # a block goes to the group its middle row falls in
        out[min(groups - 1, (sl.start + sl.stop) * groups // (2 * n_rows))].append(sl)
    return [g for g in out if g]


def train_runs(
    specs: list[RunSpec],
    data: dict[tuple[int, bool], StickyChainData],
    *,
    steps: int,
    tile: int,
    chunk: int,
    device: torch.device,
    workers: int = 1,
    snapshot_rows: Sequence[int] = (),
    snapshot_steps: Sequence[int] = (),
    progress: Any = None,
) -> RunOut:
    """Train every run of ``specs`` for ``steps`` full-batch steps, all rows of one batch.

    Each step is one pass of :func:`~.kernel.attention_forward_backward` per block of at most
    ``chunk`` rows, then the per-row update. With ``workers > 1`` on a CPU the blocks are shared
    out in consecutive groups: this process trains the first on one thread, and each other
    group is trained start to finish in a worker process (:mod:`.worker`). A row's numbers
    depend only on its block, never on ``workers``.

    Returns:
        A :class:`RunOut` (curves, final metrics, snapshots of ``snapshot_rows`` at
        ``snapshot_steps``, final weights).
    """
    t0 = time.perf_counter()
    B = len(specs)
    X = torch.stack([data[s.data_key].inputs for s in specs])
    y = torch.stack([data[s.data_key].targets for s in specs])
    blocks = split_rows(B, chunk)
    # worker processes need a Python executable to start (an embedded interpreter may have none)
    groups = group_blocks(blocks, workers if device.type == "cpu" and sys.executable else 1)

    def job(g: list[slice]) -> dict[str, Any]:
        a, b = g[0].start, g[-1].stop
        # clones: torch.save would send the whole storage under a view
        return {"specs": [astuple(s) for s in specs[a:b]], "X": X[a:b].clone(), "y": y[a:b].clone(),
                "blocks": [(sl.start - a, sl.stop - a) for sl in g], "steps": steps, "tile": tile,
                "snapshot_rows": [r - a for r in snapshot_rows if a <= r < b],
                "snapshot_steps": list(snapshot_steps), "device": str(device)}

    procs: list[WorkerProcess] = []
    before = torch.get_num_threads()
    try:
        for g in groups[1:]:  # one at a time: if one fails to start, those started are killed below
            procs.append(WorkerProcess(job(g)))
        if procs:
            torch.set_num_threads(1)
        say = None
        if progress is not None:
            def say(step: int) -> None:
                el = time.perf_counter() - t0
                progress(f"step {step}/{steps}: {el:.0f} s, {1000 * el / (B * step):.1f} ms per model-step")
        parts = [train_group(**job(groups[0]), progress=say)] + [p.result() for p in procs]
    finally:
        torch.set_num_threads(before)
        for p in procs:
            p.kill()
    curves = torch.cat([p["curves"] for p in parts]).numpy()
    snapshots: dict[int, list] = {}
    for g, p in zip(groups, parts):
        snapshots.update({g[0].start + r: v for r, v in p["snapshots"].items()})
    weights = [torch.cat([p["weights"][k] for p in parts]).to(device) for k in range(4)]
    wall = time.perf_counter() - t0
    return RunOut(curves, curves[:, steps].copy(), torch.cat([p["entropy"] for p in parts]).numpy(),
                  torch.cat([p["accuracy"] for p in parts]).numpy(), snapshots, wall, B * (steps + 1), weights)


def train_group(
    specs: list[tuple],
    X: Tensor,
    y: Tensor,
    blocks: list[tuple[int, int]],
    *,
    steps: int,
    tile: int,
    snapshot_rows: Sequence[int] = (),
    snapshot_steps: Sequence[int] = (),
    device: str = "cpu",
    progress: Any = None,
) -> dict[str, Any]:
    """Train the rows of ``specs`` (``RunSpec`` fields as tuples) block by block, in this process.

    Returns tensors only (a worker process sends them back): ``curves`` ``[rows, steps + 1]``
    (float64), ``entropy``, ``accuracy``, ``snapshots`` (row → ``[(step, weights)]``) and the final
    ``weights``.
    """
    dev = torch.device(device)
    specs = [RunSpec(*s) for s in specs]
    B = len(specs)
    X, y = X.to(dev), y.to(dev)
    W = [torch.stack(ws).to(dev) for ws in zip(*(init_weights(s.seed) for s in specs))]
    lr = torch.tensor([s.lrs for s in specs], dtype=X.dtype, device=dev)  # [B, 4]
    is_adam = torch.tensor([s.kind == "adam" for s in specs], device=dev)
    any_adam = bool(is_adam.any())
    m_list = [i for i, s in enumerate(specs) if s.kind == "mstep"]
    m_rows = torch.tensor(m_list, dtype=torch.long, device=dev)
    m_size = torch.tensor([s.m_step for s in specs], dtype=X.dtype, device=dev)
    pinv = Xm = None
    if m_list:
        Xm = X.index_select(0, m_rows)
        Xd = Xm.double()
        pinv = torch.linalg.solve(Xd.transpose(1, 2) @ Xd, Xd.transpose(1, 2)).to(X.dtype)
    adam_m = [torch.zeros_like(w) for w in W]
    adam_v = [torch.zeros_like(w) for w in W]
    b1, b2, eps = 0.9, 0.999, 1e-8
    curves = torch.zeros(B, steps + 1, dtype=torch.float64)
    snap_steps = set(snapshot_steps)
    snapshots: dict[int, list] = {r: [] for r in snapshot_rows}
    sls = [slice(a, b) for a, b in blocks]
    # M-step rows of each block, as positions inside the block (in m_rows order overall)
    local_m = [torch.tensor([i - sl.start for i in m_list if sl.start <= i < sl.stop], dtype=torch.long, device=dev)
               for sl in sls]
    for step in range(steps + 1):
        if step in snap_steps:
            for r in snapshots:
                snapshots[r].append((step, tuple(w[r].detach().cpu().clone() for w in W)))
        need_grad = step < steps
        outs = [attention_forward_backward(X[sl], y[sl], *(w[sl] for w in W), tile=tile,
                                           responsibility_rows=rr if need_grad and rr.numel() else None)
                for sl, rr in zip(sls, local_m)]
        if progress is not None and step and step % max(steps // 10, 1) == 0:
            progress(step)
        curves[:, step] = torch.cat([o.loss for o in outs]).cpu()
        if not need_grad:
            break
        grads = [torch.cat([o.grads[k] for o in outs]) for k in range(4)]
        new_V_m = None
        if m_list:
            resp_u = torch.cat([o.resp_u for o in outs if o.resp_u is not None])
            resp_mass = torch.cat([o.resp_mass for o in outs if o.resp_mass is not None])
            new_V_m = m_step_values(Xm, W[2].index_select(0, m_rows), resp_u, resp_mass,
                                    m_size.index_select(0, m_rows)[:, None, None], pinv=pinv)
        t = step + 1
        for k in range(4):
            g = grads[k]
            lr_k = lr[:, k][:, None, None]
            upd = lr_k * g
            if any_adam:
                adam_m[k].mul_(b1).add_(g, alpha=1 - b1)
                adam_v[k].mul_(b2).addcmul_(g, g, value=1 - b2)
                mhat = adam_m[k] / (1 - b1**t)
                vhat = adam_v[k] / (1 - b2**t)
                upd = torch.where(is_adam[:, None, None], lr_k * mhat / (vhat.sqrt() + eps), upd)
            W[k] = W[k] - upd
        if new_V_m is not None:
            W[2][m_rows] = new_V_m
    return {"curves": curves, "entropy": torch.cat([o.entropy for o in outs]).cpu(),
            "accuracy": torch.cat([o.accuracy for o in outs]).cpu(), "snapshots": snapshots,
            "weights": [w.cpu() for w in W]}


def evaluate_runs(weights: list[Tensor], datasets: list[StickyChainData], *, tile: int, chunk: int) -> list[np.ndarray]:
    """Loss, entropy and accuracy of each run's final weights on its own (held-out) sequence."""
    dev = weights[0].device
    X = torch.stack([d.inputs for d in datasets]).to(dev)
    y = torch.stack([d.targets for d in datasets]).to(dev)
    with torch.no_grad():
        outs = [attention_forward_backward(X[sl], y[sl], *(w[sl] for w in weights), tile=tile)
                for sl in split_rows(len(datasets), chunk)]
    return [torch.cat([getattr(o, k) for o in outs]).cpu().numpy() for k in ("loss", "entropy", "accuracy")]


def checkpoint_steps(steps: int, n: int) -> list[int]:
    """``n + 1`` evenly spaced checkpoints from 0 to ``steps`` (fewer if ``steps < n``)."""
    return sorted({int(round(v)) for v in np.linspace(0, steps, n + 1)})


def worker_main() -> None:
    """The worker process: read a job from stdin, train it, write the result to stdout."""
    from ...allocator import keep_freed_memory
    from .worker import _die_with_parent, _dumps, _loads

    _die_with_parent()
    torch.set_num_threads(1)
    keep_freed_memory()  # this process is ours: keep freed pages (see bayesmanifold/allocator.py)
    job = _loads(sys.stdin.buffer.read())
    result = train_group(**job)
    sys.stdout.buffer.write(_dumps(result))
    sys.stdout.buffer.flush()

