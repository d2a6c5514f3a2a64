"""``bayesmanifold train``: train a transformer or a baseline on a wind tunnel (Paper I)."""

import json
import math

import torch

from ..errors import ConfigError
from ..io import atomic_write_json
from ..windtunnels.registry import TASKS
from .common import (
    add_device_arg,
    add_json_arg,
    add_seed_arg,
    at_least,
    non_negative_float,
    output_dir,
    positive_float,
)
from .windtunnel_args import make_task, parse_params, quote_command

NAME = "train"
HELP = "train a transformer, LSTM or MLP on a wind tunnel; resumes a partial run in --out"
EXAMPLE = "bayesmanifold train bijection --arch transformer --steps 20000 --seed 0 --out runs/bij"


def add_arguments(parser) -> None:
    from ..models.presets import ARCHS, PRESETS

    parser.add_argument("task", choices=sorted(TASKS), help="wind tunnel")
    parser.add_argument("--param", action="append", metavar="NAME=VALUE",
                        help="task parameter, repeatable (bijection: V, L, replacement; "
                        "hmm: S, O, K; recall: N, n_keys, n_values, F, Q, ...)")
    parser.add_argument("--arch", choices=ARCHS, default="transformer")
    parser.add_argument("--preset", choices=sorted(PRESETS), default=None,
                        help="model size (default: the task's CPU preset)")
    parser.add_argument("--mlp-context", choices=("mean", "none"), default="mean",
                        help="what the MLP baseline sees of the prefix")
    parser.add_argument("--steps", type=at_least(1), default=1000)
    parser.add_argument("--batch-size", type=at_least(1), default=64)
    parser.add_argument("--lr", type=positive_float, default=1e-3)
    parser.add_argument("--warmup", type=at_least(0), default=None, help="warm-up steps (default 5%%)")
    parser.add_argument("--weight-decay", type=non_negative_float, default=0.01)
    parser.add_argument("--loss", choices=("hard", "soft"), default=None,
                        help="default: the task's (bijection hard, hmm soft)")
    add_seed_arg(parser)
    add_device_arg(parser)
    parser.add_argument("--eval-every", type=at_least(1), default=500)
    parser.add_argument("--n-eval", type=at_least(1), default=256)
    parser.add_argument("--checkpoint-every", type=at_least(1), default=500)
    parser.add_argument("--snapshots", type=at_least(0), default=0, metavar="N",
                        help="save N roughly log-spaced fp16 weight snapshots (incl. step 0)")
    parser.add_argument("--snapshot-every", type=at_least(0), default=0, metavar="K",
                        help="also save a snapshot every K steps (dense replay of a phase change)")
    parser.add_argument("--init-from", metavar="CHECKPOINT", default=None,
                        help="warm start: initial weights from a finished checkpoint of the same "
                        "task and architecture (fresh optimiser and schedule)")
    parser.add_argument("--threads", type=at_least(1), default=None, help="torch CPU threads")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_json_arg(parser, help="write the final metrics as JSON")
    parser.add_argument("--out", required=True, metavar="DIR", type=output_dir, help="checkpoint directory")


def log_spaced_steps(steps: int, n: int) -> tuple:
    """``n`` distinct, roughly log-spaced steps in [0, steps], always with 0 and ``steps``."""
    if n <= 0:
        return ()
    if n == 1:
        return (steps,)
    pts = {0, steps}
    k = n - 1
    while len(pts) < n and k < 10 * n:
        pts = {0} | {int(round(math.exp(math.log(steps) * i / (k - 1)))) for i in range(k)}
        pts.add(steps)
        k += 1
    return tuple(sorted(pts))[: max(n, 2)]


def _command(args) -> str:
    parts = ["bayesmanifold", "train", args.task]
    for p in args.param or []:
        parts += ["--param", p]
    parts += ["--arch", args.arch, "--preset", args.preset, "--steps", str(args.steps),
              "--batch-size", str(args.batch_size), "--lr", repr(args.lr),
              "--warmup", str(args.warmup), "--weight-decay", repr(args.weight_decay),
              "--seed", str(args.seed)]
    if args.arch == "mlp":
        parts += ["--mlp-context", args.mlp_context]
    if args.loss:
        parts += ["--loss", args.loss]
    if args.snapshots:
        parts += ["--snapshots", str(args.snapshots)]
    if getattr(args, "snapshot_every", 0):
        parts += ["--snapshot-every", str(args.snapshot_every)]
    if args.init_from:
        parts += ["--init-from", args.init_from]
    parts += ["--eval-every", str(args.eval_every), "--n-eval", str(args.n_eval), "--out", args.out]
    return quote_command(parts)


def run(args) -> int:
    from dataclasses import replace

    from ..allocator import keep_freed_memory
    from ..models.presets import DEFAULT_PRESET, preset_spec
    from ..models.training import TrainConfig, train

    keep_freed_memory()  # this process is ours: keep freed pages (2.5x faster small-model steps on CPU)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = args.device
    task = make_task(args.task, parse_params(args.param))
    if args.preset is None:
        args.preset = DEFAULT_PRESET.get(task.NAME, "small")
    if args.warmup is None:
        args.warmup = max(1, args.steps // 20)
    spec = preset_spec(args.preset, task, arch=args.arch)
    if args.arch == "mlp":
        spec = replace(spec, mlp_context=args.mlp_context)
    config = TrainConfig(
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        warmup_steps=min(args.warmup, args.steps),
        weight_decay=args.weight_decay,
        loss=args.loss,
        seed=args.seed,
        eval_every=min(args.eval_every, args.steps),
        n_eval=args.n_eval,
        checkpoint_every=min(args.checkpoint_every, args.steps),
        snapshot_steps=log_spaced_steps(args.steps, args.snapshots) + tuple(range(0, args.steps + 1, args.snapshot_every or args.steps + 1)[1:]),
        progress=not args.no_progress,
    )
    model = None
    if args.init_from:
        from ..models.checkpoint import load_checkpoint, refuse_unusable

        refuse_unusable(args.init_from, command="train --init-from")
        model, init_task, init_cfg, _ = load_checkpoint(args.init_from)
        if init_task != task or init_cfg["model"] != spec.to_dict():
            raise ConfigError(
                f"--init-from {args.init_from!r} holds {init_cfg['arch']} {init_cfg['model']} on "
                f"{init_task.to_dict()}; this run is {spec.to_dict()} on {task.to_dict()}"
            )
        model.train()
    res = train(task, spec, config, model=model, out_dir=args.out, preset=args.preset,
                command=_command(args), device=device, init_from=args.init_from)
    last = res.history["eval"][-1] if res.history.get("eval") else {}
    summary = {
        "task": task.NAME,
        "task_params": task.to_dict(),
        "arch": spec.arch,
        "preset": args.preset,
        "steps": config.steps,
        "entropy_mae_bits": last.get("entropy_mae_bits"),
        "mean_kl_bits": last.get("mean_kl_bits"),
        "n_eval": config.n_eval,
        "wall_time_s": res.history.get("wall_time_s"),
        "out": args.out,
    }
    if callable(getattr(task, "describe", None)):  # a text corpus: record which files were read
        atomic_write_json(f"{args.out}/corpus.json", task.describe())
        summary["heldout_loss"] = last.get("heldout_loss")
    if args.json:
        atomic_write_json(args.json, summary)
    print(json.dumps(summary))
    return 0
