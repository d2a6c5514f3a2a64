"""Training of many single-head runs as one batch: SGD, Adam and the closed-form M-step.

Every run (a method, a seed, its learning rates) is one row of a batch; the whole batch takes a
full-batch step at once through :func:`~.kernel.attention_forward_backward`. Per-row learning
rates give SGD and the EM-like schedule (10× lr on ``W_V``); rows of kind ``adam`` use Adam
(β = 0.9, 0.999, ε = 1e-8) and rows of kind ``mstep`` replace ``W_V`` by the least-squares
M-step (:func:`~.kernel.m_step_values`).
"""

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ...windtunnels.sticky_chain import StickyChainData
from .config import D_VALUE
from .kernel import attention_forward_backward, init_weights, m_step_values

__all__ = ["RunSpec", "RunOut", "train_runs", "evaluate_runs", "checkpoint_steps"]


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


def train_runs(
    specs: list[RunSpec],
    data: dict[tuple[int, bool], StickyChainData],
    *,
    steps: int,
    tile: int,
    chunk: int,
    device: torch.device,
    snapshot_rows: Sequence[int] = (),
    snapshot_steps: Sequence[int] = (),
    progress: Any = None,
) -> RunOut:
    t0 = time.perf_counter()
    B = len(specs)
    X = torch.stack([data[s.data_key].inputs for s in specs]).to(device)
    y = torch.stack([data[s.data_key].targets for s in specs]).to(device)
    W = [torch.stack(ws).to(device) for ws in zip(*(init_weights(s.seed) for s in specs))]
    lr = torch.tensor([s.lrs for s in specs], dtype=X.dtype, device=device)  # [B, 4]
    is_adam = torch.tensor([s.kind == "adam" for s in specs], device=device)
    m_rows = torch.tensor([i for i, s in enumerate(specs) if s.kind == "mstep"], dtype=torch.long, device=device)
    m_size = torch.tensor([s.m_step for s in specs], dtype=X.dtype, device=device)
    pinv = None
    if m_rows.numel():
        Xm = X.index_select(0, m_rows).double()
        pinv = torch.linalg.solve(Xm.transpose(1, 2) @ Xm, Xm.transpose(1, 2)).to(X.dtype)
    adam_m = [torch.zeros_like(w) for w in W]
    adam_v = [torch.zeros_like(w) for w in W]
    b1, b2, eps = 0.9, 0.999, 1e-8
    curves = np.zeros((B, steps + 1))
    snap_rows = set(snapshot_rows)
    snap_steps = set(snapshot_steps)
    snapshots: dict[int, list] = {r: [] for r in snap_rows}
    chunks = [torch.arange(i, min(i + chunk, B), device=device) for i in range(0, B, chunk)]

    def full_pass(need_grad: bool):
        outs = []
        for idx in chunks:
            sub = [w.index_select(0, idx) for w in W]
            rr = None
            if need_grad and m_rows.numel():
                local = torch.nonzero(torch.isin(idx, m_rows)).flatten()
                rr = local if local.numel() else None
            outs.append((idx, attention_forward_backward(
                X.index_select(0, idx), y.index_select(0, idx), *sub, tile=tile, responsibility_rows=rr)))
        return outs

    for step in range(steps + 1):
        if step in snap_steps:
            for r in snap_rows:
                snapshots[r].append((step, tuple(w[r].detach().cpu().clone() for w in W)))
        outs = full_pass(need_grad=step < steps)
        if progress is not None and step and step % max(steps // 10, 1) == 0:
            el = time.perf_counter() - t0
            progress(f"step {step}/{steps}: {el:.0f} s, {1000 * el / (B * step):.1f} ms per model-step")
        for idx, o in outs:
            curves[idx.cpu().numpy(), step] = o.loss.cpu().numpy()
        if step == steps:
            final = outs
            break
        grads = [torch.empty_like(w) for w in W]
        resp_u = resp_mass = None
        if m_rows.numel():
            resp_u = X.new_zeros(m_rows.numel(), X.shape[1], D_VALUE)
            resp_mass = X.new_zeros(m_rows.numel(), X.shape[1])
        for idx, o in outs:
            for k in range(4):
                grads[k][idx] = o.grads[k]
            if o.resp_u is not None:
                rows = idx[torch.isin(idx, m_rows)]
                pos = torch.searchsorted(m_rows, rows)
                resp_u[pos] = o.resp_u
                resp_mass[pos] = o.resp_mass
        t = step + 1
        new_V_m = None
        if m_rows.numel():
            new_V_m = m_step_values(
                X.index_select(0, m_rows), W[2].index_select(0, m_rows), resp_u, resp_mass,
                m_size.index_select(0, m_rows)[:, None, None], pinv=pinv,
            )
        for k in range(4):
            g = grads[k]
            lr_k = lr[:, k][:, None, None]
            upd = lr_k * g
            if bool(is_adam.any()):
                adam_m[k].mul_(b1).add_(g, alpha=1 - b1)
                adam_v[k].mul_(b2).addcmul_(g, g, value=1 - b2)
                mhat = adam_m[k] / (1 - b1**t)
                vhat = adam_v[k] / (1 - b2**t)
                upd = torch.where(is_adam[:, None, None], lr_k * mhat / (vhat.sqrt() + eps), upd)
            W[k] = W[k] - upd
        if new_V_m is not None:
            W[2][m_rows] = new_V_m
    final_loss = np.zeros(B)
    entropy = np.zeros(B)
    accuracy = np.zeros(B)
    for idx, o in final:
        i = idx.cpu().numpy()
        final_loss[i] = o.loss.cpu().numpy()
        entropy[i] = o.entropy.cpu().numpy()
        accuracy[i] = o.accuracy.cpu().numpy()
    wall = time.perf_counter() - t0
    return RunOut(curves, final_loss, entropy, accuracy, snapshots, wall, B * (steps + 1), W)


def evaluate_runs(weights: list[Tensor], datasets: list[StickyChainData], *, tile: int, chunk: int):
    """Loss, entropy and accuracy of each run's final weights on its own (held-out) sequence."""
    dev = weights[0].device
    X = torch.stack([d.inputs for d in datasets]).to(dev)
    y = torch.stack([d.targets for d in datasets]).to(dev)
    res = [np.zeros(len(datasets)) for _ in range(3)]
    with torch.no_grad():
        for i in range(0, len(datasets), chunk):
            sl = slice(i, min(i + chunk, len(datasets)))
            o = attention_forward_backward(X[sl], y[sl], *(w[sl] for w in weights), tile=tile)
            for r, v in zip(res, (o.loss, o.entropy, o.accuracy)):
                r[sl] = v.cpu().numpy()
    return res


def checkpoint_steps(steps: int, n: int) -> list[int]:
    """``n + 1`` evenly spaced checkpoints from 0 to ``steps`` (fewer if ``steps < n``)."""
    return sorted({int(round(v)) for v in np.linspace(0, steps, n + 1)})

