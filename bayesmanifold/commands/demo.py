"""``bayesmanifold demo``: the papers' claims tested on our trained bijection model, as a report."""

import argparse

from ..demo import build_report, summary_lines

NAME = "demo"
HELP = "run every analysis on the shipped bijection-v20 checkpoint plus EM-vs-SGD, and write report/"
EXAMPLE = "bayesmanifold demo --out report/"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="report", metavar="DIR", help="report directory (default: report)")
    p.add_argument("--checkpoint", default="bijection-v20", help="checkpoint to analyse (default: bijection-v20)")
    p.add_argument("--quick", action="store_true", help="fewer sequences and seeds (about a minute)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", metavar="PATH", help="also write summary.json's content to PATH")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    path, summary = build_report(
        args.checkpoint, out=args.out, device=args.device, seed=args.seed, quick=args.quick, em_vs_sgd=True,
        progress=not args.no_progress,
    )
    print("\n".join(summary_lines(path, summary)))
    if args.json:
        from ..io import atomic_write_json

        atomic_write_json(args.json, summary)
    return 0
