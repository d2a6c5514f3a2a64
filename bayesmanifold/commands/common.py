"""What the sub-commands share: argument types that check values as the command line is parsed,
JSON output, random or text tokens, plain-text tables.

The argument types (:func:`output_file`, :func:`output_dir`, :func:`input_file`, :func:`seed`,
:func:`device`, :func:`at_least`, ...) run while argparse reads the command line, so a bad value
(a ``--json`` that names a directory, an ``--out`` that names a file or lies in a directory that
cannot be written, ``--seed -1``, ``--device tpu``, an empty ``--text`` file) is reported as one
line with exit code 2 before any model is loaded or any work starts.
"""

import argparse
import math
import os
import tempfile
from pathlib import Path
from typing import Any

from ..errors import BayesManifoldError, ConfigError, InputError
from ..io import atomic_write_json

__all__ = [
    "add_device_arg",
    "add_json_arg",
    "add_seed_arg",
    "add_target_args",
    "at_least",
    "check_writable_dir",
    "device",
    "format_table",
    "input_file",
    "text_file",
    "model_spec",
    "add_model_args",
    "add_model_options",
    "open_model_from",
    "tokenizer_dir",
    "MODEL_HELP",
    "output_dir",
    "output_file",
    "probability",
    "replaced_dir",
    "positive_float",
    "seed",
    "tokens_for",
    "write_json",
    "BayesManifoldError",
]

_Bad = argparse.ArgumentTypeError
SEED_MAX = 2**32 - 1  # numpy's legacy seeding (TransformerLens) accepts 0 .. 2**32 - 1


# ------------------------------------------------------------------------------- path types
def _writable_dir(d: Path, what: str) -> None:
    """``d`` exists, is a directory, and a file can be created in it (probed: ``os.access`` says
    yes to root on read-only mounts and pseudo file systems)."""
    try:
        with tempfile.TemporaryFile(dir=d):
            pass
    except OSError as exc:
        raise _Bad(f"cannot write {what} in directory {str(d)!r}: {exc.strerror or exc}") from None


def check_writable_dir(d: str | os.PathLike, what: str, option: str) -> None:
    """:func:`output_dir`'s check for a directory known only once the command runs (e.g. a
    checkpoint's): a :class:`~bayesmanifold.errors.ConfigError` naming ``option``."""
    try:
        _writable_dir(Path(d), what)
    except argparse.ArgumentTypeError as exc:
        raise ConfigError(f"{option}: {exc}") from None


def _nearest_existing(p: Path) -> Path:
    """The path itself or its nearest ancestor that exists (``.`` for a relative path)."""
    for q in (p, *p.parents):
        if q.exists():
            return q
    return Path(".")


def _check_creatable(p: Path, what: str) -> None:
    """Directories up to ``p`` can be created: the nearest existing ancestor is a writable directory."""
    base = _nearest_existing(p.parent if str(p.parent) else Path("."))
    if not base.is_dir():
        raise _Bad(f"{str(base)!r} is a file, not a directory, so {what} {str(p)!r} cannot be created under it")
    _writable_dir(base, what)


def output_file(text: str) -> str:
    """A file the command will write (``--json``): not a directory; its directory exists and is
    writable, or can be created in a writable ancestor."""
    if not text:
        raise _Bad("the path is empty")
    p = Path(text)
    if p.is_dir():
        raise _Bad(f"{text!r} is a directory; give a file path such as {str(p / 'out.json')!r}")
    if p.exists() and not p.is_file():
        raise _Bad(f"{text!r} exists and is not a regular file")
    if p.parent.is_dir():
        _writable_dir(p.parent, "the file")
    else:
        _check_creatable(p, "the file")
    return text


def output_dir(text: str) -> str:
    """A directory the command will write (``--out``): an existing writable directory, or a path
    that can be created (no file in the way, writable nearest ancestor)."""
    if not text:
        raise _Bad("the path is empty")
    p = Path(text)
    if p.exists():
        if not p.is_dir():
            raise _Bad(f"{text!r} is a file, not a directory")
        _writable_dir(p, "files")
    else:
        _check_creatable(p, "the directory")
    return text


def replaced_dir(text: str) -> str:
    """A directory the command replaces as a whole (the report's ``--out``): as
    :func:`output_dir`, and its parent must take the new directory."""
    output_dir(text)
    p = Path(text)
    if p.exists():
        _writable_dir(p.resolve().parent, "the new directory")
        from ..report.document import check_replaceable

        try:
            check_replaceable(p)
        except BayesManifoldError as exc:
            raise _Bad(str(exc)) from None
    return text


def input_file(text: str) -> str:
    """A file the command reads (``--text``, ``--prompts``): exists, is a file, is not empty."""
    p = Path(text)
    if not p.exists():
        raise _Bad(f"file {text!r} does not exist")
    if not p.is_file():
        raise _Bad(f"{text!r} is a directory; give a text file")
    if not os.access(p, os.R_OK):
        raise _Bad(f"file {text!r} is not readable")
    if p.stat().st_size == 0:
        raise _Bad(f"file {text!r} is empty")
    return text


def text_file(text: str) -> str:
    """:func:`input_file` that holds UTF-8 text (``verify --text``): a binary file is refused, as
    ``scan`` refuses it."""
    import codecs

    input_file(text)
    dec = codecs.getincrementaldecoder("utf-8")()
    offset = 0
    with open(text, "rb") as fh:
        while chunk := fh.read(1 << 20):
            try:
                dec.decode(chunk)
            except UnicodeDecodeError as exc:
                at = offset + max(exc.start, 0)
                raise _Bad(f"{text!r} is not UTF-8 text (invalid byte at offset {at}); give a text file") from None
            offset += len(chunk)
    try:
        dec.decode(b"", final=True)
    except UnicodeDecodeError:
        raise _Bad(f"{text!r} is not UTF-8 text (it ends inside a character); give a text file") from None
    return text


MODEL_HELP = ("a shipped checkpoint's name (see `bayesmanifold checkpoints`) or a checkpoint directory, 'toy', "
              "a local HuggingFace directory (with or without tokenizer files), a .gguf file, or a model name (online)")


def model_spec(text: str) -> str:
    """The one grammar of a model on the command line (``--model`` and the positional MODEL alike):
    a checkpoint (shipped name or directory), ``toy``, a HuggingFace directory, a ``.gguf`` file
    or a name; paths are checked here, before any work."""
    p = Path(text)
    if not text:
        raise _Bad(f"the model is empty; give {MODEL_HELP}")
    if text.lower().endswith(".gguf"):
        if not p.is_file():
            raise _Bad(f"GGUF file {text!r} does not exist")
        return text
    if p.is_file():
        raise _Bad(f"{text!r} is a file but not a .gguf file; give {MODEL_HELP}")
    looks_like_path = os.path.sep in text or text.startswith(".")
    if looks_like_path and not p.exists():
        raise _Bad(f"model directory {text!r} does not exist; give {MODEL_HELP}")
    if p.is_dir() and not (p / "config.json").is_file():
        raise _Bad(f"{text!r} holds no config.json: it is neither a checkpoint nor a HuggingFace directory")
    return text


def tokenizer_dir(text: str) -> str:
    """A directory holding a HuggingFace tokenizer (``--tokenizer``)."""
    p = Path(text)
    if not p.is_dir():
        raise _Bad(f"tokenizer directory {text!r} does not exist")
    if not any((p / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")):
        raise _Bad(f"{text!r} holds no tokenizer files (tokenizer.json, tokenizer_config.json, vocab.json or tokenizer.model)")
    return text


def add_model_args(p: argparse.ArgumentParser, *, positional: str | None = None, default: str | None = None,
                   dtypes: tuple[str, ...] | None = None, device_default: str = "cpu") -> None:
    """The model options every command shares: the model (``--model SPEC``, or the positional
    ``positional``), ``--dtype``, ``--device`` and ``--tokenizer``, with one grammar and one list."""

    if positional:
        p.add_argument(positional, metavar="MODEL", type=model_spec, help=MODEL_HELP)
    else:
        p.add_argument("--model", default=default, metavar="SPEC", type=model_spec,
                       help=MODEL_HELP + (f" (default: {default})" if default else ""))
    add_model_options(p, dtypes=dtypes, device_default=device_default)


def add_model_options(p: argparse.ArgumentParser, *, dtypes: tuple[str, ...] | None = None,
                      device_default: str = "cpu") -> None:
    """``--dtype``, ``--device`` and ``--tokenizer`` (the model itself given otherwise, e.g. by :func:`add_target_args`)."""
    from ..backends.loading import DTYPE_NAMES

    names = dtypes or DTYPE_NAMES
    p.add_argument("--dtype", default="float32", choices=names,
                   help=f"the dtype the model runs in: {', '.join(names)} (float16 on CUDA only; default float32)")
    add_device_arg(p, default=device_default)
    p.add_argument("--tokenizer", metavar="DIR", type=tokenizer_dir, default=None,
                   help="a directory holding a tokenizer, for a HuggingFace model saved without one")


def open_model_from(args: argparse.Namespace, spec: str | None = None, *, task: str | None = None):
    """The :class:`~bayesmanifold.models.Target` the parsed model options name (one loader for every command)."""
    from ..models.target import open_target

    return open_target(spec if spec is not None else args.model, task=task, device=args.device, dtype=args.dtype,
                       seed=getattr(args, "seed", 0), tokenizer=getattr(args, "tokenizer", None))


# ----------------------------------------------------------------------------- value types
def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise _Bad(f"expected an integer, got {text!r}") from None


def seed(text: str) -> int:
    """A seed in 0 .. 2**32 − 1."""
    v = _int(text)
    if not 0 <= v <= SEED_MAX:
        raise _Bad(f"a seed must lie in 0..{SEED_MAX}, got {v}")
    return v


def at_least(minimum: int, maximum: int | None = None):
    """An argument type: an integer >= ``minimum`` (and <= ``maximum``)."""

    def check(text: str) -> int:
        v = _int(text)
        if v < minimum or (maximum is not None and v > maximum):
            span = f">= {minimum}" if maximum is None else f"in {minimum}..{maximum}"
            raise _Bad(f"must be an integer {span}, got {v}")
        return v

    check.__name__ = f"integer >= {minimum}"
    return check


def _float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise _Bad(f"expected a number, got {text!r}") from None
    if not math.isfinite(v):
        raise _Bad(f"expected a finite number, got {text!r}")
    return v


def positive_float(text: str) -> float:
    v = _float(text)
    if v <= 0:
        raise _Bad(f"must be > 0, got {v:g}")
    return v


def non_negative_float(text: str) -> float:
    v = _float(text)
    if v < 0:
        raise _Bad(f"must be >= 0, got {v:g}")
    return v


def probability(text: str) -> float:
    """A number in [0, 1)."""
    v = _float(text)
    if not 0 <= v < 1:
        raise _Bad(f"must lie in [0, 1), got {v:g}")
    return v


def device(text: str) -> str:
    """``cpu``, ``cuda``, ``cuda:N``, ``mps`` or ``auto`` (cuda when available, else cpu), checked
    against the machine; ``auto`` is resolved here."""
    if text == "cpu":
        return text
    name, _, index = text.partition(":")
    if name not in ("cuda", "mps", "auto") or (index and (name != "cuda" or not index.isdigit())):
        raise _Bad(f"unknown device {text!r}; accepted: cpu, cuda, cuda:N, mps, auto")
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "mps":
        if not torch.backends.mps.is_available():
            raise _Bad("device 'mps' was asked for but Apple's MPS is not available here; use cpu")
        return text
    if not torch.cuda.is_available():
        raise _Bad(f"device {text!r} was asked for but no CUDA GPU is available; use cpu")
    if index and int(index) >= torch.cuda.device_count():
        raise _Bad(f"device {text!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return text


# ------------------------------------------------------------------------------- arguments
def add_device_arg(p: argparse.ArgumentParser, default: str = "cpu") -> None:
    p.add_argument("--device", type=device, default=default, help=f"cpu, cuda[:N], mps or auto (default: {default})")


def add_seed_arg(p: argparse.ArgumentParser, default: int = 0, help: str = "seed") -> None:
    p.add_argument("--seed", type=seed, default=default, help=f"{help} (0..2**32-1; default {default})")


def add_target_args(p: argparse.ArgumentParser) -> None:
    """The model to study, and for a non-checkpoint its wind tunnel or prompts (analyze, report)."""
    p.add_argument("target", metavar="MODEL", type=model_spec, help=MODEL_HELP)
    p.add_argument("--task", metavar="NAME", choices=["bijection", "hmm", "recall"],
                   help="wind tunnel for a model that is not a checkpoint (bijection, hmm, recall; default parameters)")
    p.add_argument("--prompts", metavar="FILE", type=prompts_file,
                   help="prompts for Paper III's protocol at each final token: a text file (one per line), a .jsonl "
                        "file (one object with a 'text' per line) or a shipped set: paper3-smollm2 (75 prompts, "
                        "stratified for SmolLM2), paper3-smollm2-pool (its 400 candidates)")


def prompts_file(text: str) -> str:
    """``--prompts``: a shipped prompt set's name (``paper3-smollm2``), or a file as :func:`input_file` checks it."""
    from ..data import PROMPT_SETS

    return text if text in PROMPT_SETS else input_file(text)


def add_json_arg(p: argparse.ArgumentParser, help: str = "write the numbers as JSON to PATH (atomically)") -> None:
    p.add_argument("--json", metavar="PATH", type=output_file, help=help)


def write_json(path: str | None, data: Any) -> None:
    if path:
        atomic_write_json(path, data)


# --------------------------------------------------------------------------------- tokens
def tokens_for(model: Any, *, batch_size: int, seq_len: int, text: str | None, seed: int):
    """Token ids ``[batch_size, seq_len]``: from a text file (the model's tokenizer, or UTF-8 bytes
    for a byte-level model), else uniformly random ids from a seeded generator."""
    import torch

    from ..backends import model_access

    access = model_access(model)
    if batch_size < 1 or seq_len < 2:
        raise InputError(f"--batch-size must be >= 1 and --seq-len >= 2, got {batch_size} and {seq_len}")
    n_ctx = access.n_ctx
    if n_ctx is not None and seq_len > n_ctx:
        raise InputError(f"--seq-len {seq_len} exceeds the model's context n_ctx={n_ctx}")
    if text is None:
        g = torch.Generator().manual_seed(seed)
        return torch.randint(0, access.d_vocab, (batch_size, seq_len), generator=g).to(access.device)
    path = Path(text)
    if not path.is_file():
        raise InputError(f"text file {text!r} does not exist")
    ids = access.encode(path.read_text(encoding="utf-8", errors="replace"))
    if ids.numel() == 0:
        raise InputError(f"text file {text!r} holds no tokens")
    need = batch_size * seq_len
    if ids.numel() < need:
        raise InputError(f"the text has {ids.numel()} tokens; {need} are needed for {batch_size}×{seq_len}")
    return access.as_tokens(ids[:need].view(batch_size, seq_len)).to(access.device)


def format_table(rows: list[dict], columns: list[tuple[str, str, str]]) -> str:
    """Plain-text table: columns are (key, header, format spec)."""
    head = "  ".join(f"{h:>{max(len(h), 10)}}" for _, h, _ in columns)
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append("  ".join(f"{format(r[k], fmt):>{max(len(h), 10)}}" for k, h, fmt in columns))
    return "\n".join(lines)
