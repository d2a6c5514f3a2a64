"""``bayesmanifold report``: every analysis on a model, as one self-contained HTML report."""

import argparse

from .common import (
    add_device_arg,
    add_json_arg,
    add_seed_arg,
    add_target_args,
    replaced_dir,
    write_json,
)

NAME = "report"
HELP = "test the papers' claims on a checkpoint or model and write a self-contained HTML report"
EXAMPLE = "bayesmanifold report bijection-v20 --out report/"


def add_report_options(p: argparse.ArgumentParser) -> None:
    """Options shared by ``report`` and ``demo``."""
    p.add_argument("--out", default="report", metavar="DIR", type=replaced_dir, help="report directory (default: report)")
    p.add_argument("--quick", action="store_true", help="fewer sequences and seeds")
    add_device_arg(p)
    add_seed_arg(p, help="seed of the sampled sequences")
    add_json_arg(p, help="also write summary.json's content to PATH")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_target_args(p)
    p.add_argument("--em-vs-sgd", action="store_true", help="also run Paper II's EM-like vs SGD experiment")
    add_report_options(p)


def print_report(config, json_path: str | None) -> int:
    """Build the report, print the short summary, and write ``--json`` if asked."""
    from ..report import build_report, summary_lines

    path, summary = build_report(config)
    print("\n".join(summary_lines(path, summary)))
    write_json(json_path, summary)
    return 0


def run(args: argparse.Namespace) -> int:
    from ..models.checkpoint import refuse_unusable
    from ..report import ReportConfig

    refuse_unusable(args.target, command="report", attention=True)

    config = ReportConfig(target=args.target, out=args.out, device=args.device, seed=args.seed, quick=args.quick,
                          task=args.task, prompts=args.prompts, em_vs_sgd=args.em_vs_sgd, progress=not args.no_progress)
    return print_report(config, args.json)
