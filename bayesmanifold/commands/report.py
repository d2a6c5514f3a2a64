"""``bayesmanifold report``: every analysis on a model, as one self-contained HTML report."""

import argparse

from ..demo import build_report, summary_lines
from .common import add_target_args

NAME = "report"
HELP = "test the papers' claims on a checkpoint or model and write a self-contained HTML report"
EXAMPLE = "bayesmanifold report bijection-v20 --out report/"


def add_report_options(p: argparse.ArgumentParser) -> None:
    """Options shared by ``report`` and ``demo``."""
    p.add_argument("--out", default="report", metavar="DIR", help="report directory (default: report)")
    p.add_argument("--quick", action="store_true", help="fewer sequences and seeds")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    p.add_argument("--seed", type=int, default=0, help="seed of the sampled sequences (default 0)")
    p.add_argument("--json", metavar="PATH", help="also write summary.json's content to PATH")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_target_args(p)
    p.add_argument("--em-vs-sgd", action="store_true", help="also run Paper II's EM-like vs SGD experiment")
    add_report_options(p)


def report_and_print(args: argparse.Namespace, target: str, **kwargs) -> int:
    """Build the report, print the short summary, and write ``--json`` if asked."""
    path, summary = build_report(
        target, out=args.out, device=args.device, seed=args.seed, quick=args.quick, progress=not args.no_progress, **kwargs
    )
    print("\n".join(summary_lines(path, summary)))
    if args.json:
        from ..io import atomic_write_json

        atomic_write_json(args.json, summary)
    return 0


def run(args: argparse.Namespace) -> int:
    return report_and_print(args, args.target, task=args.task, prompts=args.prompts, em_vs_sgd=args.em_vs_sgd)
