"""``bayesmanifold demo``: the papers' claims tested on our trained bijection model, as a report."""

import argparse

from .report import add_report_options, print_report

NAME = "demo"
HELP = "run every analysis on the shipped bijection-v20 checkpoint plus EM-vs-SGD, and write report/"
EXAMPLE = "bayesmanifold demo --out report/"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", default="bijection-v20", help="checkpoint to analyse (default: bijection-v20)")
    add_report_options(p)


def run(args: argparse.Namespace) -> int:
    from ..allocator import keep_freed_memory
    from ..demo import demo_config

    keep_freed_memory()  # this process is ours: keep freed pages (the live EM-vs-SGD section)
    config = demo_config(out=args.out, checkpoint=args.checkpoint, device=args.device, seed=args.seed,
                         quick=args.quick, progress=not args.no_progress)
    return print_report(config, args.json)
