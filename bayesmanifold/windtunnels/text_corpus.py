"""A real-text "task": next-byte prediction on a corpus of source files (default: Python's stdlib).

Unlike the wind tunnels there is no exact posterior: the task only samples training windows and
measures the held-out loss. It plugs into the same training loop (:func:`bayesmanifold.models.
training.train`), checkpoints and ``bayesmanifold train text`` command as the wind tunnels.

Corpus ``"stdlib"``: every ``.py`` file under the running interpreter's standard-library directory
(``sysconfig.get_paths()["stdlib"]``), skipping any directory named ``test``, ``tests``,
``site-packages``, ``__pycache__`` or starting with ``idle_test``. Any other ``corpus`` value is a
directory whose ``.py`` files are read the same way. Files are sorted by relative path (POSIX
form); file ``i`` is **held out** when ``i % holdout_every == 0`` (so about 1 in 20 files by
default, spread over the alphabet); ``max_files > 0`` keeps ``max_files`` files evenly spaced
over the sorted list (for quick runs). With ``bpe_vocab = 0`` (default) the text is read
**byte-level**: the token ids are the files' raw bytes (vocabulary 256, no tokenizer), files
concatenated in order. With ``bpe_vocab = V`` (≥ 258) a byte-level BPE of V tokens is learned
from the training files (:mod:`bayesmanifold.windtunnels.bpe`) and the files (decoded as UTF-8)
are encoded with it, each followed by ``<|endoftext|>``; the checkpoint saves that tokenizer.

:meth:`TextCorpusTask.describe` records the Python version, the stdlib path, the file lists and
a SHA-256 over every (path, content) pair, so that a checkpoint says exactly what it read.
Training windows are ``seq_len`` consecutive bytes starting at a uniformly random offset of the
training stream (a seeded ``torch.Generator``); the loss is the next-byte cross-entropy at every
position but the last. The held-out loss is measured on ``n`` windows evenly spaced over the
held-out stream.
"""

import hashlib
import os
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from jaxtyping import Int
from torch import Tensor

from ..errors import TaskError
from .base import TaskBatch, WindTunnel, _check_int, make_generator
from .bpe import encode_documents, save_tokenizer, tokenizer_description, train_bpe

__all__ = ["TextCorpusTask", "corpus_files", "SKIP_DIRS"]

SKIP_DIRS = ("test", "tests", "site-packages", "__pycache__")
_CACHE: dict[tuple, dict[str, Any]] = {}


def _root(corpus: str) -> Path:
    return Path(sysconfig.get_paths()["stdlib"]) if corpus == "stdlib" else Path(corpus)


def corpus_files(corpus: str = "stdlib") -> list[str]:
    """The relative paths (sorted, POSIX) of the corpus's ``.py`` files (see the module doc)."""
    root = _root(corpus)
    if not root.is_dir():
        raise TaskError(f"text corpus {corpus!r}: {str(root)!r} is not a directory; accepted: 'stdlib' or a directory of .py files")
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in SKIP_DIRS and not d.startswith(("idle_test", "."))]
        for n in filenames:
            if n.endswith(".py") and not n.startswith("."):
                out.append((Path(dirpath) / n).relative_to(root).as_posix())
    return sorted(out)


@dataclass(frozen=True, kw_only=True)
class TextCorpusTask(WindTunnel):
    """Next-byte prediction on source files, with a held-out file set.

    Args:
        corpus: ``"stdlib"`` or a directory of ``.py`` files.
        seq_len: bytes per training window (the model's context).
        holdout_every: file ``i`` (sorted) is held out when ``i % holdout_every == 0``.
        max_files: use only this many files, evenly spaced (0 = all).
        bpe_vocab: 0 = raw bytes (vocabulary 256); V >= 258 = a byte-level BPE of V tokens
            learned from the training files.

    Example:
        >>> task = TextCorpusTask(seq_len=64, max_files=8)
        >>> task.sample(2, generator=0).tokens.shape
        torch.Size([2, 64])
    """

    NAME = "text"
    DEFAULT_LOSS = "hard"

    corpus: str = "stdlib"
    seq_len: int = 256
    holdout_every: int = 20
    max_files: int = 0
    bpe_vocab: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.corpus, str) or not self.corpus:
            raise TaskError(f"corpus must be 'stdlib' or a directory path; got {self.corpus!r}")
        _check_int("seq_len", self.seq_len, 2)
        _check_int("holdout_every", self.holdout_every, 2)
        _check_int("max_files", self.max_files, 0)
        _check_int("bpe_vocab", self.bpe_vocab, 0)
        if 0 < self.bpe_vocab < 258:
            raise TaskError(f"bpe_vocab must be 0 (raw bytes) or at least 258 (256 bytes, <|endoftext|> and a merge), got {self.bpe_vocab}")

    def to_dict(self) -> dict[str, Any]:
        d = super().to_dict()
        if not self.bpe_vocab:  # byte-level configs stay as they were before BPE existed
            d.pop("bpe_vocab")
        return d

    # ------------------------------------------------------------------ the data
    def _data(self) -> dict[str, Any]:
        key = (self.corpus, self.holdout_every, self.max_files, self.bpe_vocab)
        if key not in _CACHE:
            root = _root(self.corpus)
            files = corpus_files(self.corpus)
            if self.max_files and len(files) > self.max_files:
                files = [files[i * len(files) // self.max_files] for i in range(self.max_files)]
            if len(files) < 2:
                raise TaskError(f"text corpus {self.corpus!r} has {len(files)} .py files; at least 2 are needed (one held out)")
            h = hashlib.sha256()
            parts: dict[bool, list[bytes]] = {True: [], False: []}
            for i, rel in enumerate(files):
                data = (root / rel).read_bytes()
                h.update(rel.encode() + b"\0" + hashlib.sha256(data).digest())
                parts[i % self.holdout_every == 0].append(data)
            tok = None
            if self.bpe_vocab:
                texts = {k: [p.decode("utf-8", errors="replace") for p in v] for k, v in parts.items()}
                tok = train_bpe(texts[False], self.bpe_vocab)
                train, held = encode_documents(tok, texts[False]), encode_documents(tok, texts[True])
            else:
                train = np.frombuffer(b"".join(parts[False]), dtype=np.uint8)
                held = np.frombuffer(b"".join(parts[True]), dtype=np.uint8)
            for name, arr in (("training", train), ("held-out", held)):
                if len(arr) < self.seq_len:
                    raise TaskError(f"the {name} files of {self.corpus!r} hold {len(arr)} tokens, fewer than seq_len={self.seq_len}")
            _CACHE[key] = {
                "root": str(root),
                "files": files,
                "sha256": h.hexdigest(),
                "train": torch.from_numpy(train.astype(np.int64)),
                "held": torch.from_numpy(held.astype(np.int64)),
                "tokenizer": tok,
                "n_bytes": {k: sum(len(p) for p in v) for k, v in parts.items()},
            }
        return _CACHE[key]

    def describe(self) -> dict[str, Any]:
        """Python version, corpus root, file lists, their SHA-256 and byte counts (JSON-safe)."""
        d = self._data()
        files = d["files"]
        return {
            "corpus": self.corpus,
            "tokenization": (tokenizer_description(d["tokenizer"]) if d["tokenizer"] is not None
                             else "utf8-bytes (raw file bytes, vocabulary 256)"),
            "python_version": sys.version.split()[0],
            "python": sys.version,
            # the stdlib's location says nothing about the corpus (version and SHA-256 do) and
            # names the training machine's directories: recorded as the sysconfig key only
            "root": "sysconfig stdlib" if self.corpus == "stdlib" else d["root"],
            "sha256": d["sha256"],
            "n_files": len(files),
            "train_files": [f for i, f in enumerate(files) if i % self.holdout_every],
            "heldout_files": [f for i, f in enumerate(files) if i % self.holdout_every == 0],
            "n_train_bytes": int(d["n_bytes"][False]),
            "n_heldout_bytes": int(d["n_bytes"][True]),
            "n_train_tokens": int(len(d["train"])),
            "n_heldout_tokens": int(len(d["held"])),
        }

    def save_tokenizer(self, directory: "str | Path") -> "Path | None":
        """Write the BPE tokenizer (HuggingFace files) to ``directory``; None for a byte-level task."""
        tok = self._data()["tokenizer"] if self.bpe_vocab else None
        return None if tok is None else save_tokenizer(tok, directory)

    # ------------------------------------------------------------------ WindTunnel interface
    @property
    def d_vocab(self) -> int:
        return self.bpe_vocab or 256

    @property
    def answer_tokens(self) -> Int[Tensor, " n_answer"]:
        return torch.arange(self.d_vocab)

    @property
    def positions(self) -> Int[Tensor, " n_sup"]:
        return torch.arange(self.seq_len - 1)

    def _batch(self, tokens: Tensor) -> TaskBatch:
        return TaskBatch(
            tokens=tokens,
            positions=self.positions,
            answer_tokens=self.answer_tokens,
            posterior=torch.zeros(tokens.shape[0], self.seq_len - 1, 0, dtype=torch.float64),  # no exact posterior
            targets=tokens[:, 1:],
        )

    def sample(self, batch_size: int, generator: "int | torch.Generator") -> TaskBatch:
        """``batch_size`` random training windows (the ``posterior`` is empty: there is none)."""
        B = self._check_batch_size(batch_size)
        g = make_generator(generator)
        stream = self._data()["train"]
        starts = torch.randint(0, len(stream) - self.seq_len + 1, (B,), generator=g)
        return self._batch(stream[starts[:, None] + torch.arange(self.seq_len)])

    def heldout_windows(self, n: int) -> Tensor:
        """``n`` windows ``[n, seq_len]`` evenly spaced over the held-out stream (fixed)."""
        _check_int("n", n, 1)
        held = self._data()["held"]
        starts = torch.linspace(0, len(held) - self.seq_len, n).round().long().unique()
        return held[starts[:, None] + torch.arange(self.seq_len)]

    @torch.no_grad()
    def evaluate(self, model: torch.nn.Module, *, n: int = 64, device: "str | torch.device" = "cpu", chunk: int = 16) -> dict[str, float]:
        """Mean next-token cross-entropy on ``n`` held-out windows (nats per token; for a BPE task
        also nats and bits per byte, scaled by the held-out stream's bytes per token)."""
        windows = self.heldout_windows(n)
        total, count = 0.0, 0
        for s in range(0, len(windows), chunk):
            x = windows[s : s + chunk].to(device)
            logits = model(x)[:, :-1].double()
            ce = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1), reduction="sum")
            total += float(ce)
            count += x[:, 1:].numel()
        loss = total / count
        per_byte = loss
        if self.bpe_vocab:
            d = self._data()
            per_byte = loss * len(d["held"]) / d["n_bytes"][True]
            return {"heldout_loss": loss, "heldout_loss_per_byte": per_byte, "heldout_bits_per_byte": per_byte / float(np.log(2)),
                    "bytes_per_token": d["n_bytes"][True] / len(d["held"]), "n_heldout_windows": int(len(windows))}
        return {"heldout_loss": loss, "heldout_bits_per_byte": loss / float(np.log(2)), "n_heldout_windows": int(len(windows))}
