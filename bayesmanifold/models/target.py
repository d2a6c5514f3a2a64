"""The one way every command and the library open a model: :func:`open_target`.

A spec is one of:

- a shipped checkpoint's name (``bijection-v20``) or a checkpoint directory written by
  ``bayesmanifold train``: the model, its wind tunnel, its config and training record;
- ``toy``, a local HuggingFace directory (with or without tokenizer files), a ``.gguf`` file, or a
  model name on the hub (online): through :func:`bayesmanifold.backends.load_model`, with an
  optional wind tunnel ``task`` for it.

``dtype`` and ``device`` are honoured on every path, and the :class:`Target` says which dtype ran.

Example:
    >>> target = open_target("bijection-v20", dtype="float64")  # doctest: +SKIP
    >>> target.model, target.task, target.dtype  # doctest: +SKIP
"""

import contextlib
import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..backends import MODEL_SPECS, load_model, model_access, parse_dtype
from ..backends.loading import check_device_dtype
from ..errors import CheckpointError, InputError, ModelError

__all__ = ["Target", "open_target", "open_model", "checkpoint_dir_of"]


@dataclass(frozen=True, eq=False)
class Target:
    """A model to study and what came with it: its wind tunnel, checkpoint config and training record."""

    model: Any
    task: Any = None
    config: dict = field(default_factory=dict)
    history: dict = field(default_factory=dict)
    checkpoint_dir: Path | None = None
    spec: str | None = None

    @property
    def dtype(self) -> torch.dtype:
        """The dtype the model runs in (its floating-point weights'; LSTM and MLP baselines included)."""
        return next((p.dtype for p in self.model.parameters() if p.is_floating_point()), torch.float32)

    @property
    def kind(self) -> str:
        """``"checkpoint"`` (ours) or ``"model"``."""
        return "checkpoint" if self.checkpoint_dir is not None else "model"


def checkpoint_dir_of(spec: str) -> Path | None:
    """The checkpoint directory a spec names (a shipped name or a directory of ours), else None."""
    from . import checkpoint as ck

    try:
        d = ck.resolve_checkpoint(spec)
    except CheckpointError:
        return None
    return d if ck.declared_config(d) is not None else None


def open_target(spec: str, *, task: str | None = None, device: str = "cpu", dtype: str | torch.dtype = "float32",
                seed: int = 0, tokenizer: str | None = None) -> Target:
    """Open ``spec`` (see the module doc) in ``dtype`` on ``device``.

    Args:
        spec: a checkpoint (shipped name or directory), ``toy``, a HuggingFace directory, a
            ``.gguf`` file or a hub name.
        task: a wind tunnel (``bijection``, ``hmm``, ``recall``; default parameters) for a model
            that is not a checkpoint (a checkpoint brings its own).
        device, dtype: where and in what the model runs.
        seed: the toy model's initialisation.
        tokenizer: a directory holding a tokenizer, for a HuggingFace directory saved without one.

    Raises:
        ModelError, CheckpointError, InputError: the spec opens nothing, the task does not fit
            the model, or the checkpoint is unfinished.
    """
    from . import checkpoint as ck

    spec = str(spec)
    dt = parse_dtype(dtype)
    check_device_dtype(device, dt)
    ckpt_dir = checkpoint_dir_of(spec)
    if ckpt_dir is not None:
        if task is not None:
            raise InputError(f"{spec!r} is a checkpoint: it brings its own task; --task is for other models")
        if tokenizer is not None:
            raise InputError(f"{spec!r} is a checkpoint: it brings its own tokenizer (or reads bytes)")
        model, tk, cfg, history = ck.load_checkpoint(ckpt_dir, device=device)
        if dt != torch.float32:
            from .baselines import CausalMLP, LSTMModel

            with contextlib.redirect_stdout(io.StringIO()):  # TransformerLens prints the dtype change
                model = model.to(dt) if isinstance(model, LSTMModel | CausalMLP) else model_access(model).in_dtype(dt)
        return Target(model, tk, cfg, history, ckpt_dir, spec)
    try:
        model = load_model(spec, device=device, dtype=dt, seed=seed, tokenizer=tokenizer)
    except ModelError as exc:
        if Path(spec).exists() or spec == "toy" or spec.lower().endswith(".gguf"):
            raise
        shipped = [r["name"] for r in ck.list_shipped()]
        raise ModelError(f"{spec!r} is neither a checkpoint (a directory, or one of the shipped {shipped}) "
                         f"nor a model that loads ({MODEL_SPECS}): {exc}") from None
    tk = None
    if task:
        from ..windtunnels.registry import task_from_dict

        tk = task_from_dict({"task": task})
        access = model_access(model)
        if tk.d_vocab > (access.d_vocab or 0) or tk.seq_len > (access.n_ctx or 0):
            raise InputError(f"task {task} (d_vocab {tk.d_vocab}, seq_len {tk.seq_len}) does not fit the model "
                             f"(d_vocab {access.d_vocab}, n_ctx {access.n_ctx})")
    return Target(model, tk, spec=spec)


def open_model(spec: str, **kwargs: Any):
    """The model :func:`open_target` opens (checkpoints included), without the rest."""
    return open_target(spec, **kwargs).model
