"""The ``bayesmanifold`` command line: a thin layer over the library's functions.

Each sub-command lives in ``bayesmanifold/commands/<name>.py`` and defines ``NAME``, ``HELP``,
``EXAMPLE``, ``add_arguments(parser)`` and ``run(args) -> int``.

The error contract: a bad invocation (an unknown option, a value out of range, an output path that
cannot be written, a model that cannot be loaded, ...) prints ONE line on stderr and exits with
code 2, without a traceback; an interrupt prints one line and exits with 130. Values are checked
while the command line is parsed (see :mod:`bayesmanifold.commands.common`), before any work.
``--debug`` shows the full traceback instead.
"""

import argparse
import importlib
import os
import sys
import warnings
from collections.abc import Sequence

from .errors import BayesManifoldError

__all__ = ["main", "build_parser"]

PROG = "bayesmanifold"
MAX_MESSAGE = 400  # characters of an error message printed (some libraries list thousands of names)

# One entry per sub-command module, in the order --help lists them.
COMMAND_MODULES: list[str] = [
    "demo",
    "report",
    "verify",
    "analyze",
    "sula",
    "train",
    "calibrate",
    "checkpoints",
    "prepare",
    "reproduce",
    "scan",
    "merge",
    "map",
    "paper-size",
]


class UsageError(Exception):
    """A command line argparse rejected; ``prog`` names the (sub-)command."""

    def __init__(self, prog: str, message: str) -> None:
        super().__init__(message)
        self.prog = prog


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is raised (and printed by :func:`main` as one line)."""

    def error(self, message: str):  # type: ignore[override]
        raise UsageError(self.prog, f"{message} (see '{self.prog} --help')")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog=PROG,
        description="Measure the gradient dynamics of attention on TransformerLens models "
        "(advantage routing, responsibility-weighted values, Bayesian manifolds).",
    )
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        mod = importlib.import_module(f"bayesmanifold.commands.{name.replace('-', '_')}")
        p = sub.add_parser(
            mod.NAME,
            help=mod.HELP,
            description=mod.HELP,
            epilog=f"example:\n  {mod.EXAMPLE}" + (f"\n\n{mod.EXIT_CODES}" if hasattr(mod, "EXIT_CODES") else ""),
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show full tracebacks on errors")
        mod.add_arguments(p)
        p.set_defaults(_run=mod.run)
    return parser


def one_line(message: object, limit: int = MAX_MESSAGE) -> str:
    """An error message as one line of at most ``limit`` characters."""
    text = " ".join(str(message).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _fail(prog: str, message: object, code: int = 2) -> int:
    print(f"{prog}: error: {one_line(message)}", file=sys.stderr)
    return code


def _os_message(exc: OSError) -> str:
    where = f" {exc.filename!r}" if exc.filename else ""
    return f"{exc.strerror or exc}{':' if where else ''}{where}"


def _warning_printer(prog: str):
    """A ``warnings.showwarning`` that prints one line on stderr: ``prog: warning: message``
    (Python's default prints the file, line and source line of the library code that warned)."""

    def show(message, category, filename, lineno, file=None, line=None) -> None:
        text = " ".join(str(message).split())
        print(f"{prog}: warning: {text}", file=file or sys.stderr)

    return show


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line ``argv`` (default: ``sys.argv[1:]``) and return the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    prog = PROG
    try:
        parser = build_parser()
        try:
            args = parser.parse_args(argv)
        except SystemExit as exc:  # --help
            return int(exc.code or 0) if not isinstance(exc.code, str) else _fail(prog, exc.code)
        if not getattr(args, "command", None):
            parser.print_help()
            return 0
        prog = f"{PROG} {args.command}"
        with warnings.catch_warnings():  # restores warnings.showwarning on the way out
            if not debug:
                warnings.showwarning = _warning_printer(prog)
            return int(args._run(args) or 0)
    except UsageError as exc:
        if debug:
            raise
        return _fail(exc.prog, exc)
    except BayesManifoldError as exc:
        if debug:
            raise
        return _fail(prog, exc)
    except KeyboardInterrupt:
        if debug:
            raise
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # the reader of our output went away (``bayesmanifold checkpoints | head``): stop quietly,
        # and keep Python from reporting the broken pipe again when it flushes stdout at exit
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return 141
    except OSError as exc:  # the file system or the network said no: a disk full, a lost mount
        if debug:
            raise
        return _fail(prog, _os_message(exc))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
