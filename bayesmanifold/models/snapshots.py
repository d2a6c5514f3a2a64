"""Weight snapshots and the lineage of warm-started runs.

A checkpoint's ``snapshots/step_XXXXXX.pt`` files hold fp16 weights at chosen steps, for replaying
the training dynamics (:func:`bayesmanifold.analyses.replay`). They are numbered by
*cumulative* step: a run warm-started from a finished checkpoint continues its parent's lineage
(:func:`parent_lineage`) and carries its parent's snapshots over (:func:`carry_snapshots`), so the
trajectory of a multi-stage training lives in its last checkpoint.

Every file is written to a temporary name and renamed.
"""

import shutil
from pathlib import Path

import torch
from torch import nn

from ..errors import CheckpointError
from ..io import atomic_torch_save, ensure_dir
from .checkpoint import (
    SNAPSHOTS,
    checkpoint_tokenizer,
    load_weights,
    read_config,
    resolve_checkpoint,
)
from .presets import ModelSpec, build_model, move_model

__all__ = ["save_snapshot", "list_snapshots", "load_snapshot", "carry_snapshots", "parent_lineage"]


def parent_lineage(init_from: "str | Path") -> tuple[int, list[dict]]:
    """What a run warm-started from the finished checkpoint ``init_from`` continues.

    Returns ``(step_offset, lineage)``: the updates the parent's weights have had in all (its own
    steps plus its own offset), and the list of earlier stages, oldest first, each as
    ``{"checkpoint", "command", "steps", "step_offset"}``. A continued run numbers its snapshots
    by this cumulative step, so one checkpoint holds the whole trajectory.
    """
    cfg = read_config(init_from)
    if not cfg.get("complete"):
        raise CheckpointError(f"{str(init_from)!r} is not a finished run; a warm start needs one")
    offset = int(cfg.get("step_offset", 0))
    stage = {"checkpoint": str(init_from), "command": cfg.get("command"),
             "steps": int(cfg["step"]), "step_offset": offset}
    return offset + int(cfg["step"]), list(cfg.get("lineage", [])) + [stage]


def carry_snapshots(src: "str | Path", out_dir: "str | Path") -> int:
    """Copy ``src``'s weight snapshots into ``out_dir/snapshots`` (those not there yet).

    Each file is copied to a temporary name and renamed. Returns the number copied.
    """
    n = 0
    for _, f in list_snapshots(src):
        dest = Path(out_dir) / SNAPSHOTS / f.name
        if dest.exists():
            continue
        ensure_dir(dest.parent)
        tmp = dest.with_name(dest.name + ".tmp")
        shutil.copyfile(f, tmp)
        tmp.replace(dest)
        n += 1
    return n


def save_snapshot(out_dir: "str | Path", step: int, model: nn.Module) -> Path:
    """Save fp16 weights to ``<out_dir>/snapshots/step_XXXXXX.pt``."""
    sd = {k: (v.detach().cpu().half() if v.is_floating_point() else v.detach().cpu())
          for k, v in model.state_dict().items()}
    return atomic_torch_save(Path(out_dir) / SNAPSHOTS / f"step_{int(step):06d}.pt", sd)


def list_snapshots(path_or_name: "str | Path") -> list[tuple[int, Path]]:
    """``[(step, file)]`` of a checkpoint's weight snapshots, by step."""
    d = resolve_checkpoint(path_or_name) / SNAPSHOTS
    if not d.is_dir():
        return []
    out = []
    for f in d.glob("step_*.pt"):
        try:
            out.append((int(f.stem.split("_")[1]), f))
        except (IndexError, ValueError):
            continue
    return sorted(out)


def load_snapshot(path_or_name: "str | Path", step: int, device: "str | torch.device" = "cpu") -> nn.Module:
    """The checkpoint's model with the weights of snapshot ``step`` (fp32, eval mode)."""
    d = resolve_checkpoint(path_or_name)
    snaps = dict(list_snapshots(d))
    if step not in snaps:
        raise CheckpointError(f"{str(d)!r} has no snapshot at step {step}; available {sorted(snaps)}")
    cfg = read_config(d)
    model = build_model(ModelSpec.from_dict(cfg["model"]), seed=0, tokenizer=checkpoint_tokenizer(d))
    load_weights(model, snaps[step])
    return move_model(model, device).eval()
