"""Training of many single-head runs as one batch: SGD, Adam and the closed-form M-step.

Every run (a method, a seed, its learning rates) is one row of a batch; the whole batch takes a
full-batch step at once through :func:`~.kernel.attention_forward_backward`. Per-row learning
rates give SGD and the EM-like schedule (10× lr on ``W_V``); rows of kind ``adam`` use Adam
(β = 0.9, 0.999, ε = 1e-8) and rows of kind ``mstep`` replace ``W_V`` by the least-squares
M-step (:func:`~.kernel.m_step_values`).
"""

import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ...windtunnels.sticky_chain import StickyChainData
from .kernel import attention_forward_backward, init_weights, m_step_values

__all__ = ["RunSpec", "RunOut", "train_runs", "evaluate_runs", "checkpoint_steps", "split_rows", "worker_pool"]


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


@contextmanager
def worker_pool(workers: int) -> Iterator[ThreadPoolExecutor | None]:
    """``workers`` threads that each run torch ops on one intra-op thread (None for one worker).

    The row blocks of a batch are independent, so running them concurrently, one per core, uses
    the cores without the per-op synchronisation of intra-op threads (which mostly waits on
    small ops and on a loaded machine). torch's thread setting is restored on exit.
    """
    if workers <= 1:
        yield None
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with ThreadPoolExecutor(workers, initializer=torch.set_num_threads, initargs=(1,)) as pool:
            yield pool
    finally:
        torch.set_num_threads(before)


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
    ``chunk`` rows (blocks run concurrently on ``workers`` threads), then the per-row update.

    Returns:
        A :class:`RunOut` (curves, final metrics, snapshots of ``snapshot_rows`` at
        ``snapshot_steps``, final weights).
    """
    t0 = time.perf_counter()
    B = len(specs)
    X = torch.stack([data[s.data_key].inputs for s in specs]).to(device)
    y = torch.stack([data[s.data_key].targets for s in specs]).to(device)
    W = [torch.stack(ws).to(device) for ws in zip(*(init_weights(s.seed) for s in specs))]
    lr = torch.tensor([s.lrs for s in specs], dtype=X.dtype, device=device)  # [B, 4]
    is_adam = torch.tensor([s.kind == "adam" for s in specs], device=device)
    any_adam = bool(is_adam.any())
    m_list = [i for i, s in enumerate(specs) if s.kind == "mstep"]
    m_rows = torch.tensor(m_list, dtype=torch.long, device=device)
    m_size = torch.tensor([s.m_step for s in specs], dtype=X.dtype, device=device)
    pinv = None
    if m_list:
        Xm = X.index_select(0, m_rows)
        Xd = Xm.double()
        pinv = torch.linalg.solve(Xd.transpose(1, 2) @ Xd, Xd.transpose(1, 2)).to(X.dtype)
    adam_m = [torch.zeros_like(w) for w in W]
    adam_v = [torch.zeros_like(w) for w in W]
    b1, b2, eps = 0.9, 0.999, 1e-8
    curves = np.zeros((B, steps + 1))
    snap_rows = set(snapshot_rows)
    snap_steps = set(snapshot_steps)
    snapshots: dict[int, list] = {r: [] for r in snap_rows}
    blocks = split_rows(B, chunk)
    # M-step rows of each block, as positions inside the block (in m_rows order overall)
    local_m = [torch.tensor([i - sl.start for i in m_list if sl.start <= i < sl.stop], dtype=torch.long, device=device)
               for sl in blocks]

    def one_block(k: int, need_grad: bool):
        sl, rr = blocks[k], local_m[k]
        rr = rr if need_grad and rr.numel() else None
        return attention_forward_backward(X[sl], y[sl], *(w[sl] for w in W), tile=tile, responsibility_rows=rr)

    with worker_pool(workers) as pool:
        for step in range(steps + 1):
            if step in snap_steps:
                for r in snap_rows:
                    snapshots[r].append((step, tuple(w[r].detach().cpu().clone() for w in W)))
            need_grad = step < steps
            if pool is None:
                outs = [one_block(k, need_grad) for k in range(len(blocks))]
            else:
                outs = list(pool.map(one_block, range(len(blocks)), [need_grad] * len(blocks)))
            if progress is not None and step and step % max(steps // 10, 1) == 0:
                el = time.perf_counter() - t0
                progress(f"step {step}/{steps}: {el:.0f} s, {1000 * el / (B * step):.1f} ms per model-step")
            curves[:, step] = torch.cat([o.loss for o in outs]).cpu().numpy()
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
    final_loss = curves[:, steps].copy()
    entropy = torch.cat([o.entropy for o in outs]).cpu().numpy()
    accuracy = torch.cat([o.accuracy for o in outs]).cpu().numpy()
    wall = time.perf_counter() - t0
    return RunOut(curves, final_loss, entropy, accuracy, snapshots, wall, B * (steps + 1), W)


def evaluate_runs(
    weights: list[Tensor], datasets: list[StickyChainData], *, tile: int, chunk: int, workers: int = 1
) -> list[np.ndarray]:
    """Loss, entropy and accuracy of each run's final weights on its own (held-out) sequence."""
    dev = weights[0].device
    X = torch.stack([d.inputs for d in datasets]).to(dev)
    y = torch.stack([d.targets for d in datasets]).to(dev)

    def one_block(sl: slice):
        with torch.no_grad():
            return attention_forward_backward(X[sl], y[sl], *(w[sl] for w in weights), tile=tile)

    blocks = split_rows(len(datasets), chunk)
    with worker_pool(workers) as pool:
        outs = [one_block(sl) for sl in blocks] if pool is None else list(pool.map(one_block, blocks))
    return [torch.cat([getattr(o, k) for o in outs]).cpu().numpy() for k in ("loss", "entropy", "accuracy")]


def checkpoint_steps(steps: int, n: int) -> list[int]:
    """``n + 1`` evenly spaced checkpoints from 0 to ``steps`` (fewer if ``steps < n``)."""
    return sorted({int(round(v)) for v in np.linspace(0, steps, n + 1)})

