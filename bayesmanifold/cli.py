"""The ``bayesmanifold`` command line: a thin layer over the library's functions.

Each sub-command lives in ``bayesmanifold/commands/<name>.py`` and defines ``NAME``, ``HELP``,
``EXAMPLE``, ``add_arguments(parser)`` and ``run(args) -> int``. Errors caused by bad input are
printed as one line on stderr with exit code 2; ``--debug`` shows the full traceback.
"""

import argparse
import importlib
import os
import sys
from collections.abc import Sequence

from .errors import BayesManifoldError

__all__ = ["main", "build_parser"]

# One entry per sub-command module, in the order --help lists them.
COMMAND_MODULES: list[str] = [
    "demo",
    "report",
    "verify",
    "analyze",
    "train",
    "calibrate",
    "checkpoints",
    "reproduce",
    "scan",
    "merge",
    "map",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bayesmanifold",
        description="Measure the gradient dynamics of attention on TransformerLens models "
        "(advantage routing, responsibility-weighted values, Bayesian manifolds).",
    )
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        mod = importlib.import_module(f"bayesmanifold.commands.{name}")
        p = sub.add_parser(
            mod.NAME,
            help=mod.HELP,
            description=mod.HELP,
            epilog=f"example:\n  {mod.EXAMPLE}",
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show full tracebacks on errors")
        mod.add_arguments(p)
        p.set_defaults(_run=mod.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return 0
    debug = getattr(args, "debug", False)
    try:
        return int(args._run(args) or 0)
    except BayesManifoldError as exc:
        if debug:
            raise
        print(f"bayesmanifold {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if debug:
            raise
        print(f"bayesmanifold {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # the reader of our output went away (``bayesmanifold checkpoints | head``): stop quietly,
        # and keep Python from reporting the broken pipe again when it flushes stdout at exit
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return 141


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
