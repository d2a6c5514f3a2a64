"""Checkpoints: atomic writes, exact resume, fp16 snapshots, and the shipped checkpoints.

A checkpoint directory holds

* ``config.json``: task parameters, architecture (:class:`ModelSpec`), preset, training config,
  seed, the exact command, step, ``complete``, parameter count, weight dtype, library versions,
  and for a warm-started run its ``init_from``, ``step_offset`` (the updates its initial weights
  had already had) and ``lineage`` (every earlier stage's checkpoint, command and steps);
* ``model.pt``: the weights (a ``state_dict``; fp16 in the shipped checkpoints, loaded as fp32);
* ``history.json``: training losses, evaluations (entropy MAE, KL), callback states, wall time;
* ``train_state.pt`` (runs in progress only): weights, optimiser, scheduler, data-RNG state, step
  and history in **one** file, so a resume never mixes two steps;
* ``tokenizer/`` (text models with a BPE vocabulary): the HuggingFace tokenizer files, given to
  the model on load so that prompts and maps read text with the training vocabulary;
* ``metrics.json`` (optional): a calibration measured after training (``bayesmanifold calibrate``);
* ``snapshots/step_XXXXXX.pt``: fp16 weights at chosen steps, for replaying the training dynamics;
  numbered by cumulative step, and a warm-started run carries its parent's snapshots over, so
  the trajectory of a multi-stage training lives in its last checkpoint.

Every file is written to a temporary name and renamed (:mod:`bayesmanifold.io`). Snapshots and
the lineage of warm-started runs are handled in :mod:`bayesmanifold.models.snapshots`.
Shipped checkpoints live in ``bayesmanifold/checkpoints/<name>/`` inside the package.
"""

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..backends import library_versions, load_tokenizer, model_access
from ..errors import CheckpointError, TaskError
from ..io import atomic_torch_save, atomic_write_json, ensure_dir
from ..windtunnels.base import WindTunnel
from ..windtunnels.registry import task_from_dict
from .presets import ModelSpec, build_model, count_params, move_model

__all__ = [
    "FORMAT",
    "METRICS",
    "save_checkpoint",
    "load_checkpoint",
    "read_config",
    "read_train_state",
    "is_complete",
    "refuse_unusable",
    "resolve_checkpoint",
    "shipped_dir",
    "list_shipped",
    "check_same_run",
    "load_weights",
    "checkpoint_tokenizer",
]

FORMAT = "bayesmanifold.checkpoint/1"
CONFIG, WEIGHTS, HISTORY, STATE, METRICS, SNAPSHOTS, TOKENIZER = (
    "config.json", "model.pt", "history.json", "train_state.pt", "metrics.json", "snapshots", "tokenizer")


def shipped_dir() -> Path:
    """Folder of the checkpoints shipped inside the package."""
    return Path(__file__).resolve().parent.parent / "checkpoints"


def _config_dict(*, task, spec, config, preset, command, step, complete, model, dtype,
                 init_from=None, step_offset=0, lineage=()) -> dict:
    return {
        "format": FORMAT,
        "task": task.to_dict(),
        "arch": spec.arch,
        "preset": preset,
        "model": spec.to_dict(),
        "train": config.to_dict(),
        "seed": config.seed,
        "command": command,
        "init_from": init_from,
        "step_offset": int(step_offset),
        "lineage": list(lineage),
        "step": int(step),
        "complete": bool(complete),
        "n_params": count_params(model),
        "weights_dtype": dtype,
        "versions": library_versions(),
    }


def save_checkpoint(
    out_dir: "str | Path",
    *,
    model: nn.Module,
    task: WindTunnel,
    spec: ModelSpec,
    config,
    step: int,
    history: dict,
    complete: bool,
    preset: "str | None" = None,
    command: "str | None" = None,
    init_from: "str | None" = None,
    step_offset: int = 0,
    lineage: "tuple | list" = (),
    optimizer: "torch.optim.Optimizer | None" = None,
    scheduler: Any = None,
    generator: "torch.Generator | None" = None,
) -> Path:
    """Write a checkpoint. The resume state (if an optimiser is given) is one atomic file."""
    out = ensure_dir(out_dir)
    weights = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    cfg = _config_dict(task=task, spec=spec, config=config, preset=preset, command=command,
                       step=step, complete=complete, model=model, dtype="float32",
                       init_from=init_from, step_offset=step_offset, lineage=lineage)
    if optimizer is not None and not complete:
        atomic_torch_save(out / STATE, {
            "format": FORMAT,
            "config": cfg,
            "step": int(step),
            "model": weights,
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict() if scheduler is not None else None,
            "data_rng": generator.get_state() if generator is not None else None,
            "history": history,
        })
    save_tok = getattr(task, "save_tokenizer", None)
    if callable(save_tok) and not (out / TOKENIZER / "tokenizer.json").is_file():
        save_tok(out / TOKENIZER)
    atomic_torch_save(out / WEIGHTS, weights)
    atomic_write_json(out / HISTORY, history)
    atomic_write_json(out / CONFIG, cfg)
    if complete:
        (out / STATE).unlink(missing_ok=True)
    return out


def _same(a: Any, b: Any) -> bool:
    return json.loads(json.dumps(a)) == json.loads(json.dumps(b))


def check_same_run(cfg: dict, expect: dict, where: "str | Path") -> None:
    """Raise :class:`CheckpointError` unless ``cfg`` records the run ``expect`` describes.

    ``expect`` holds ``task``, ``spec`` and ``config``; the progress bar and the evaluation,
    logging and checkpoint cadences may differ.
    """
    mine = expect["config"].to_dict()
    theirs = dict(cfg.get("train", {}))
    for k in ("progress", "eval_every", "checkpoint_every", "log_every"):
        mine.pop(k, None)
        theirs.pop(k, None)
    checks = [("task", expect["task"].to_dict(), cfg.get("task")),
              ("model", expect["spec"].to_dict(), cfg.get("model")),
              ("train", mine, theirs)]
    for what, a, b in checks:
        if not _same(a, b):
            raise CheckpointError(
                f"{str(where)!r} holds a run with a different {what} configuration ({b}) than "
                f"requested ({a}); use another output directory"
            )


def read_train_state(out_dir: "str | Path", expect: "dict | None" = None) -> "dict | None":
    """The resume state of a partial run in ``out_dir`` (None if there is none).

    With ``expect`` (task, spec, config), raises :class:`CheckpointError` when the directory holds
    a run of another configuration (``progress`` and ``eval``/checkpoint cadence may differ).
    """
    path = Path(out_dir) / STATE
    if not path.is_file():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:
        raise CheckpointError(f"cannot read resume state {str(path)!r}: {exc}") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{str(path)!r} is not a bayesmanifold resume state ({FORMAT})")
    if expect is not None:
        check_same_run(state["config"], expect, out_dir)
    return state


def resolve_checkpoint(path_or_name: "str | Path") -> Path:
    """A checkpoint directory from a path or a shipped checkpoint's name."""
    p = Path(path_or_name)
    if p.is_dir():
        return p
    cand = shipped_dir() / str(path_or_name)
    if isinstance(path_or_name, str) and "/" not in path_or_name and cand.is_dir():
        return cand
    names = [d["name"] for d in list_shipped()]
    raise CheckpointError(
        f"no checkpoint directory {str(path_or_name)!r}; give a directory or one of the shipped "
        f"names {names}"
    )


def declared_config(d: "str | Path") -> dict | None:
    """The ``config.json`` of directory ``d`` when it declares the bayesmanifold checkpoint format
    (any version), else None: the one lenient reader (a HuggingFace directory's config.json, an
    unreadable file or no file at all is "not ours", never an error)."""
    try:
        cfg = json.loads((Path(d) / CONFIG).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(cfg, dict) or not str(cfg.get("format", "")).startswith(FORMAT.rsplit("/", 1)[0]):
        return None
    return cfg


def read_config(path_or_name: "str | Path") -> dict:
    """The ``config.json`` of a checkpoint, validated."""
    d = resolve_checkpoint(path_or_name)
    f = d / CONFIG
    if not f.is_file():
        raise CheckpointError(f"{str(d)!r} has no {CONFIG}; it is not a bayesmanifold checkpoint")
    try:
        cfg = json.loads(f.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"cannot read {str(f)!r}: {exc}") from None
    if not isinstance(cfg, dict) or cfg.get("format") != FORMAT:
        raise CheckpointError(f"{str(f)!r} is not a {FORMAT} config")
    for key in ("task", "model", "train"):
        if key not in cfg:
            raise CheckpointError(f"{str(f)!r} lacks the {key!r} entry")
    return cfg


def is_complete(path: "str | Path") -> bool:
    """Whether ``path`` (a directory or a shipped name) holds a finished checkpoint."""
    try:
        return bool(read_config(path).get("complete"))
    except CheckpointError:
        return False


def load_state_dict(model: nn.Module, sd: Any, where: str) -> None:
    """Load ``sd`` into ``model``: a transformer through its backend (either checkpoint format), our
    LSTM and MLP baselines as plain modules; every parameter must be present with its shape."""
    from .baselines import CausalMLP, LSTMModel

    if not isinstance(model, LSTMModel | CausalMLP):
        return model_access(model).load_state_dict(sd, where)
    if not isinstance(sd, dict):
        raise CheckpointError(f"{where} is not a state dict")
    ref = model.state_dict()
    missing = sorted(set(ref) - set(sd))
    wrong = sorted(k for k in set(ref) & set(sd) if tuple(sd[k].shape) != tuple(ref[k].shape))
    if missing or wrong:
        raise CheckpointError(f"{where} does not fit the model: missing {missing[:5]}, wrong shapes {wrong[:5]}")
    model.load_state_dict({k: sd[k].to(ref[k].dtype) for k in ref}, strict=True)


def refuse_unusable(spec: "str | Path", *, command: str, exact_posterior: bool = False, text: bool = False,
                    attention: bool = False) -> None:
    """Before any work, refuse a checkpoint of ours that ``command`` cannot measure, with the reason.

    An unfinished training run (``complete`` false: weights of an intermediate step, a resume
    state beside them) is not measured as if it were finished; with ``exact_posterior`` a model
    trained on a task without an exact posterior (a text corpus) is refused. Anything that is not
    a bayesmanifold checkpoint (``toy``, a HuggingFace directory, a model name) passes unchanged:
    the loader judges it. With ``text`` a wind-tunnel model without a tokenizer is refused (it
    cannot read a text prompt); with ``attention`` an LSTM or MLP baseline (no attention to measure).

    Raises:
        CheckpointError: an unfinished run. TaskError: no exact posterior where one is needed.
    """
    try:
        d = resolve_checkpoint(spec)
    except CheckpointError:
        return
    cfg = declared_config(d)
    if cfg is None or cfg.get("format") != FORMAT:
        return
    if not cfg.get("complete"):
        total = (cfg.get("train") or {}).get("steps")
        state = " and a resume state (train_state.pt)" if (d / STATE).is_file() else ""
        raise CheckpointError(
            f"{str(spec)!r} holds an unfinished training run (weights of step {cfg.get('step')}"
            f"{f' of {total}' if total else ''}{state}): {command} measures finished checkpoints only; finish it by "
            f"rerunning its training command (recorded in its config.json) with --out {str(d)!r}"
        )
    task = (cfg.get("task") or {}).get("task")
    if attention and cfg.get("arch") not in (None, "transformer"):
        raise CheckpointError(f"{str(spec)!r} is a {cfg.get('arch')} baseline, not an attention model: {command} measures "
                              "attention heads; give a transformer checkpoint (calibrate measures baselines too)")
    if exact_posterior and task == "text":
        raise TaskError(f"{str(spec)!r} is a text model: {command} needs a task with an exact posterior "
                        "(bijection, hmm, recall checkpoints)")
    if text and task != "text" and not (d / TOKENIZER / "tokenizer.json").is_file():
        raise TaskError(f"{str(spec)!r} is a {task} wind-tunnel model with no tokenizer: {command} reads a text prompt; "
                        "give a text model (e.g. stdlib-attn2), or call routing_map(model, token_ids) from Python")


def load_weights(model: nn.Module, file: Path) -> None:
    """Load the weights file ``file`` into ``model`` (its backend's ``load_state_dict``; LSTM and MLP
    baselines: every parameter must fit)."""
    if not file.is_file():
        raise CheckpointError(f"checkpoint weights {str(file)!r} are missing")
    try:
        sd = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"cannot read weights {str(file)!r}: {exc}") from None
    load_state_dict(model, sd, f"weights {str(file)!r}")


def checkpoint_tokenizer(directory: "str | Path") -> Any:
    """The tokenizer a checkpoint directory saved (``tokenizer/``), or None (byte-level models)."""
    d = Path(directory) / TOKENIZER
    return load_tokenizer(d) if (d / "tokenizer.json").is_file() else None


def load_checkpoint(path_or_name: "str | Path", device: "str | torch.device" = "cpu"):
    """Load a checkpoint directory or a shipped checkpoint by name.

    Returns:
        ``(model, task, config, history)``: the model in eval mode (fp32), the task rebuilt from
        its parameters, the config dict and the training history dict.

    Example:
        >>> model, task, config, history = load_checkpoint("bijection-v20")
    """
    d = resolve_checkpoint(path_or_name)
    cfg = read_config(d)
    try:
        task = task_from_dict(cfg["task"])
        spec = ModelSpec.from_dict(cfg["model"])
    except Exception as exc:
        raise CheckpointError(f"{str(d)!r} has an invalid task or model config: {exc}") from None
    model = build_model(spec, seed=0, tokenizer=checkpoint_tokenizer(d))
    load_weights(model, d / WEIGHTS)
    history: dict = {}
    if (d / HISTORY).is_file():
        try:
            history = json.loads((d / HISTORY).read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise CheckpointError(f"cannot read {str(d / HISTORY)!r}: {exc}") from None
    move_model(model, device).eval()
    return model, task, cfg, history


def list_shipped() -> list[dict]:
    """One dict per shipped checkpoint: name, task, arch, params, steps, recorded MAE.

    ``steps`` counts the last training stage; ``total_steps`` adds the updates of the stages it
    was warm-started from (``step_offset``).
    """
    root = shipped_dir()
    rows = []
    if not root.is_dir():
        return rows
    for d in sorted(p for p in root.iterdir() if p.is_dir() and (p / CONFIG).is_file()):
        try:
            cfg = json.loads((d / CONFIG).read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            continue
        mae = None
        n_seqs = None
        if (d / METRICS).is_file():
            try:
                m = json.loads((d / METRICS).read_text(encoding="utf-8"))
                mae, n_seqs = m.get("entropy_mae_bits"), m.get("n_seqs")
            except (OSError, json.JSONDecodeError):
                pass
        rows.append({
            "name": d.name,
            "task": cfg.get("task", {}).get("task"),
            "task_params": {k: v for k, v in cfg.get("task", {}).items() if k != "task"},
            "arch": cfg.get("arch"),
            "preset": cfg.get("preset"),
            "n_params": cfg.get("n_params"),
            "steps": cfg.get("step"),
            "total_steps": (cfg.get("step") or 0) + int(cfg.get("step_offset") or 0),
            "entropy_mae_bits": mae,
            "n_seqs": n_seqs,
        })
    return rows
