"""``bayesmanifold paper-size``: paper-size wind-tunnel runs for an accelerator, and the size trend.

``paper-size run``: train the authors' bijection model (6 layers × 6 heads, d_model 192; or
``--preset hmm-paper``) within ``--time-budget`` seconds on ``--device cuda`` with bf16 autocast,
with snapshots every 100 steps to 1,000 then log-spaced, and measure every claim with both
protocols; writes ``OUT/checkpoint`` (fp16 weights), ``OUT/report`` and ``OUT/paper_size.json``.

``paper-size trend CHECKPOINT[@STEP] ...``: the authors' value-manifold and focusing protocols, and
ours, on each checkpoint (or snapshot), one row each.
"""

import argparse

from .common import (
    add_device_arg,
    add_json_arg,
    add_seed_arg,
    at_least,
    format_table,
    output_dir,
    positive_float,
    write_json,
)

NAME = "paper-size"
HELP = "train the paper's wind-tunnel model within a time budget and measure every claim (run), or the size trend (trend)"
EXAMPLE = "bayesmanifold paper-size run --device cuda --time-budget 360 --out paper_run --json paper_run.json"


def add_arguments(p: argparse.ArgumentParser) -> None:
    from ..models.presets import PRESETS

    p.add_argument("mode", choices=["run", "trend"], help="run: train and measure; trend: measure checkpoints")
    p.add_argument("checkpoints", nargs="*", metavar="CHECKPOINT[@STEP]", help="trend: checkpoints or snapshots to measure")
    p.add_argument("--preset", choices=sorted(PRESETS), default="bijection-paper", help="run: model shape (default bijection-paper)")
    p.add_argument("--task", choices=["bijection", "hmm"], default=None, help="run: task (default: the preset's)")
    p.add_argument("--steps", type=at_least(1), default=None, help="run: steps (default: the paper schedule's, capped by the budget)")
    p.add_argument("--batch-size", type=at_least(1), default=None)
    p.add_argument("--time-budget", type=positive_float, default=360.0, metavar="S",
                   help="run: training seconds (default 360: with the report, under 9 minutes on one H100 by our estimate)")
    p.add_argument("--no-budget", action="store_true", help="run: train the full --steps whatever the time")
    p.add_argument("--no-bf16", action="store_true", help="run: float32 training on CUDA")
    p.add_argument("--quick-report", action="store_true", help="run: the report's quick mode")
    p.add_argument("--keep-snapshots", action="store_true", help="run: keep the fp16 snapshots in OUT/checkpoint")
    p.add_argument("--n-seqs", type=at_least(8), default=3200, help="trend: sequences for the authors' protocols (default 3200)")
    add_seed_arg(p)
    add_device_arg(p)
    p.add_argument("--out", metavar="DIR", type=output_dir, default=None, help="run: output directory")
    p.add_argument("--no-progress", action="store_true")
    add_json_arg(p)


def _trend(args: argparse.Namespace) -> int:
    from ..errors import InputError
    from ..experiments.paper_size import size_trend

    if not args.checkpoints:
        raise InputError("paper-size trend needs at least one CHECKPOINT[@STEP]")
    res = size_trend(args.checkpoints, n_seqs=args.n_seqs, seed=args.seed)
    cols = [("checkpoint", "checkpoint", "s"), ("step", "step", "d"), ("shape", "shape", "s"), ("params", "params", "d"),
            ("entropy_mae_bits", "MAE", ".4f"), ("authors_pc1_values", "PC1 val", ".3f"),
            ("authors_best_abs_r_values", "|r| val", ".2f"), ("authors_pc1_prefix", "PC1 pre", ".3f"),
            ("pc1_position_r2_prefix", "pos/PC1", ".2f"), ("authors_focusing", "focus", ".3f"),
            ("authors_focusing_last", "focus last", ".3f"), ("ours_pc1", "ours PC1", ".3f")]
    print(format_table(res.rows, cols))
    write_json(args.json, res.to_dict())
    return 0


def run(args: argparse.Namespace) -> int:
    from ..errors import InputError

    if args.mode == "trend":
        return _trend(args)
    from ..experiments.paper_size import PaperRunConfig, run_paper_size

    if args.out is None:
        raise InputError("paper-size run needs --out DIR")
    if args.checkpoints:
        raise InputError("paper-size run takes no checkpoints (they are for trend)")
    config = PaperRunConfig(preset=args.preset, task=args.task, steps=args.steps, batch_size=args.batch_size,
                            time_budget_s=None if args.no_budget else args.time_budget, seed=args.seed,
                            device=args.device, bf16=not args.no_bf16, quick_report=args.quick_report,
                            keep_snapshots=args.keep_snapshots)
    res = run_paper_size(config, args.out, progress=not args.no_progress)
    n = res.numbers
    print(f"paper-size run on {n['device']}: {n['plan']['steps']} of the paper's {n['plan']['paper_steps']} steps "
          f"({1000 * n['plan']['step_time_s']:.1f} ms/step), train {n['timings_s']['train']:.0f} s, "
          f"report {n['timings_s']['report']:.0f} s")
    mark = {True: "yes", False: "no", None: "—"}
    for c in n["claims"]:
        auth = f"{c['authors_measured']} [{mark[c['authors_held']]}]" if c.get("authors_measured") else "—"
        print(f"- {c['claim']}\n    authors': {auth}\n    ours: {c['measured']} [{mark[c['held']]}]")
    print(f"results: {res.out / 'paper_size.json'}")
    write_json(args.json, n)
    return 0
