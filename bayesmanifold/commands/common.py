"""Argument helpers shared by the sub-commands (devices, dtypes, JSON output, tokens)."""

import argparse
from pathlib import Path

import torch

from ..errors import BayesManifoldError, InputError
from ..io import atomic_write_json

__all__ = ["add_device_arg", "add_json_arg", "write_json", "tokens_for", "format_table"]


def add_device_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")


def add_target_args(p: argparse.ArgumentParser) -> None:
    """The model to study, and for a non-checkpoint its wind tunnel or prompts (analyze, report)."""
    p.add_argument("target", metavar="CHECKPOINT|MODEL", help="a checkpoint directory or shipped name, 'toy', or a local HuggingFace directory")
    p.add_argument("--task", metavar="NAME", help="wind tunnel for a model that is not a checkpoint (bijection, hmm, recall; default parameters)")
    p.add_argument("--prompts", metavar="FILE", help="text file, one prompt per line: run Paper III's protocol at each final token")


def add_json_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", metavar="PATH", help="write the numbers as JSON to PATH (atomically)")


def write_json(path: str | None, data: dict) -> None:
    if path:
        atomic_write_json(path, data)


def tokens_for(model, *, batch_size: int, seq_len: int, text: str | None, seed: int) -> torch.Tensor:
    """Token ids ``[batch_size, seq_len]``: from a text file (model tokenizer, or UTF-8 bytes for
    a model without one), else uniformly random ids from a seeded generator."""
    if batch_size < 1 or seq_len < 2:
        raise InputError(f"--batch-size must be >= 1 and --seq-len >= 2, got {batch_size} and {seq_len}")
    n_ctx = model.cfg.n_ctx
    if seq_len > n_ctx:
        raise InputError(f"--seq-len {seq_len} exceeds the model's context n_ctx={n_ctx}")
    device = model.cfg.device
    if text is None:
        g = torch.Generator().manual_seed(seed)
        return torch.randint(0, model.cfg.d_vocab, (batch_size, seq_len), generator=g).to(device)
    path = Path(text)
    if not path.is_file():
        raise InputError(f"text file {text!r} does not exist")
    raw = path.read_text(encoding="utf-8", errors="replace")
    if model.tokenizer is not None:
        ids = model.tokenizer(raw, return_tensors="pt")["input_ids"][0]
    else:
        ids = torch.tensor(list(raw.encode("utf-8")), dtype=torch.long)
        if int(ids.max()) >= model.cfg.d_vocab:
            raise InputError("the text has bytes outside the toy model's vocabulary")
    need = batch_size * seq_len
    if ids.numel() < need:
        raise InputError(f"the text has {ids.numel()} tokens; {need} are needed for {batch_size}×{seq_len}")
    return ids[:need].view(batch_size, seq_len).to(device)


def format_table(rows: list[dict], columns: list[tuple[str, str, str]]) -> str:
    """Plain-text table: columns are (key, header, format spec)."""
    head = "  ".join(f"{h:>{max(len(h), 10)}}" for _, h, _ in columns)
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append("  ".join(f"{format(r[k], fmt):>{max(len(h), 10)}}" for k, h, fmt in columns))
    return "\n".join(lines)


__all__ += ["BayesManifoldError"]
