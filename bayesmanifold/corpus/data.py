"""Reading a corpus into one stream of token ids, and packing it into fixed-length windows.

Formats (``fmt``; ``"auto"`` picks by the path):

- ``"tokens"`` (auto: a ``.npy`` file): an integer array of token ids, memory-mapped; a 2-D array
  is read row-major as one stream. Every id must lie in ``0..d_vocab-1``.
- ``"jsonl"`` (auto: ``.jsonl``/``.json``): JSON Lines, one object per line with a string field
  ``"text"``; each line is one document. Blank lines are skipped.
- ``"text"`` (auto: anything else): a UTF-8 text file (one document), or a directory: every
  regular file under it whose path has no component starting with ``.``, in sorted order of the
  relative paths, one document each.

Text is tokenised document by document with the model's tokenizer (TransformerLens ``to_tokens``,
so each document starts with the BOS token when the model prepends one); a model without a
tokenizer whose vocabulary covers the 256 byte values reads the UTF-8 bytes of each document.
Documents are concatenated in order into one stream.

Packing (the fixed, documented order every scan, rank and resumed run agrees on): window ``i`` is
``stream[i*seq_len : (i+1)*seq_len]`` for ``i = 0 .. n_sequences-1``; the tail shorter than one
window is dropped; ``max_tokens`` keeps the first ``max_tokens // seq_len`` windows (reading text
stops once enough tokens are in). Batch ``k`` holds windows ``k*batch_size .. (k+1)*batch_size-1``
(the last batch may be shorter). Shards are contiguous blocks of batches (:func:`split_range`).
"""

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import InputError

__all__ = ["TokenStream", "read_corpus", "detect_format", "split_range", "FORMATS"]

FORMATS = ("auto", "text", "jsonl", "tokens")
_CHUNK = 1 << 22  # ids checked / hashed per step (memory-mapped arrays are read in chunks)


@dataclass(frozen=True, eq=False)
class TokenStream:
    """A corpus as one stream of token ids, with where it came from.

    Attributes:
        tokens: 1-D integer array (possibly memory-mapped); only the first ``n_used`` ids are used.
        n_used: ids the windows cover (``n_sequences * seq_len``).
        seq_len: window length.
        source: the path given.
        format: ``"text"``, ``"jsonl"`` or ``"tokens"``.
        tokenization: ``"tokenizer"`` (the model's), ``"utf8-bytes"`` or ``"token-ids"`` (a .npy).
        n_documents: documents read (files or lines; 1 for a token array).
        fingerprint: SHA-256 of the used ids (int64, little-endian) and the window length.
    """

    tokens: np.ndarray
    n_used: int
    seq_len: int
    source: str
    format: str
    tokenization: str
    n_documents: int
    fingerprint: str

    @property
    def n_sequences(self) -> int:
        return self.n_used // self.seq_len

    def window(self, start: int, stop: int) -> torch.Tensor:
        """Windows ``start..stop-1`` as int64 token ids ``[stop - start, seq_len]``."""
        L = self.seq_len
        arr = np.asarray(self.tokens[start * L : stop * L], dtype=np.int64)
        return torch.from_numpy(arr.reshape(stop - start, L).copy())

    def describe(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "format": self.format,
            "tokenization": self.tokenization,
            "n_documents": self.n_documents,
            "n_tokens_available": int(len(self.tokens)),
            "fingerprint": self.fingerprint,
        }


def detect_format(path: str | os.PathLike, fmt: str = "auto") -> str:
    """The format of ``path``: ``fmt`` itself unless it is ``"auto"``."""
    if fmt not in FORMATS:
        raise InputError(f"unknown corpus format {fmt!r}; accepted: {', '.join(FORMATS)}")
    if fmt != "auto":
        return fmt
    p = Path(path)
    if p.is_dir():
        return "text"
    suffix = p.suffix.lower()
    return {".npy": "tokens", ".jsonl": "jsonl", ".json": "jsonl"}.get(suffix, "text")


def split_range(lo: int, hi: int, n: int, i: int) -> tuple[int, int]:
    """Block ``i`` of ``[lo, hi)`` cut into ``n`` contiguous blocks whose sizes differ by at most 1
    (the larger blocks first)."""
    size, extra = divmod(hi - lo, n)
    start = lo + i * size + min(i, extra)
    return start, start + size + (1 if i < extra else 0)


def read_corpus(
    path: str | os.PathLike,
    access: Any,
    *,
    seq_len: int,
    fmt: str = "auto",
    max_tokens: int | None = None,
) -> TokenStream:
    """Read ``path`` into a :class:`TokenStream` of whole ``seq_len`` windows (see the module doc).

    Args:
        path: a text file, a directory of text files, a JSON Lines file, or a ``.npy`` array.
        access: the model's access layer (:func:`bayesmanifold.backends.model_access`): its
            tokenizer, ``d_vocab`` and ``n_ctx``.
        seq_len: window length (2 ≤ seq_len ≤ n_ctx).
        fmt: ``"auto"``, ``"text"``, ``"jsonl"`` or ``"tokens"``.
        max_tokens: use at most this many tokens (whole windows).

    Raises:
        InputError: a missing, unreadable or non-UTF-8 file, a malformed JSON line, ids outside
            the vocabulary, a text corpus for a model that can read neither tokens nor bytes, or
            a corpus with fewer tokens than one window.
    """
    p = Path(path)
    if not p.exists():
        raise InputError(f"corpus {str(p)!r} does not exist; expected a text file, a directory of text files, a .jsonl or a .npy file")
    kind = detect_format(p, fmt)
    budget = None if max_tokens is None else (max_tokens // seq_len) * seq_len
    if kind == "tokens":
        ids, n_docs, how = _read_npy(p, access), 1, "token-ids"
    else:
        if p.is_dir() and kind == "jsonl":
            raise InputError(f"--format jsonl needs a .jsonl file, {str(p)!r} is a directory")
        docs = _jsonl_documents(p) if kind == "jsonl" else _text_documents(p)
        ids, n_docs, how = _tokenize(docs, access, budget)
    n_avail = len(ids)
    n_seq = n_avail // seq_len if budget is None else min(n_avail, budget) // seq_len
    if n_seq == 0:
        what = "no tokens" if n_avail == 0 else f"{n_avail} tokens, fewer than one window of --seq-len {seq_len}"
        raise InputError(f"the corpus {str(p)!r} is empty: it holds {what}")
    n_used = n_seq * seq_len
    if kind == "tokens":
        _check_ids(ids, n_used, access.d_vocab, p)
    return TokenStream(
        tokens=ids,
        n_used=n_used,
        seq_len=seq_len,
        source=str(p),
        format=kind,
        tokenization=how,
        n_documents=n_docs,
        fingerprint=_fingerprint(ids, n_used, seq_len),
    )


# ------------------------------------------------------------------------------------ readers
def _read_bytes(f: Path) -> bytes:
    try:
        return f.read_bytes()
    except OSError as exc:
        raise InputError(f"cannot read {str(f)!r}: {exc.strerror or exc}") from None


def _decode(data: bytes, f: Path) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InputError(
            f"{str(f)!r} is not UTF-8 text (invalid byte 0x{data[exc.start]:02x} at offset {exc.start}); "
            "accepted: UTF-8 text, JSON Lines, or a .npy array of token ids"
        ) from None


def _text_files(root: Path) -> list[Path]:
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        # hidden directories and Python's bytecode caches are not text of the corpus
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and d != "__pycache__")
        files += [Path(dirpath) / n for n in filenames if not n.startswith(".")]
    files = [f for f in files if f.is_file()]
    return sorted(files, key=lambda f: f.relative_to(root).as_posix())


def _text_documents(p: Path):
    files = _text_files(p) if p.is_dir() else [p]
    if p.is_dir() and not files:
        raise InputError(f"the corpus directory {str(p)!r} is empty: it holds no (non-hidden) files")
    for f in files:
        yield _decode(_read_bytes(f), f)


def _jsonl_documents(p: Path):
    text = _decode(_read_bytes(p), p)
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise InputError(f"{str(p)!r} line {n} is not JSON ({exc.msg}); expected one object per line with a \"text\" field") from None
        if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
            raise InputError(f"{str(p)!r} line {n} has no string field \"text\"; expected one object per line like {{\"text\": \"...\"}}")
        yield obj["text"]


def _tokenize(docs, access: Any, budget: int | None) -> tuple[np.ndarray, int, str]:
    """Concatenate the documents' ids (stop once ``budget`` ids are in)."""
    how = access.text_encoding
    if how is None:
        raise InputError(
            f"the model has no tokenizer and its vocabulary ({access.d_vocab}) does not cover the 256 byte values, "
            "so it cannot read text; give a .npy array of token ids (--format tokens), or a tokenizer (--tokenizer DIR)"
        )

    def encode(s: str) -> np.ndarray:
        return access.encode(s).numpy()

    parts, n, n_docs = [], 0, 0
    for doc in docs:
        n_docs += 1
        if not doc:
            continue
        ids = encode(doc)
        parts.append(ids.astype(np.int64, copy=False))
        n += len(ids)
        if budget is not None and n >= budget:
            break
    ids = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
    small = np.int32 if (access.d_vocab or 0) < 2**31 else np.int64
    return ids.astype(small), n_docs, how


def _read_npy(p: Path, access: Any) -> np.ndarray:
    try:
        with open(p, "rb") as fh:
            magic = fh.read(6)
    except OSError as exc:
        raise InputError(f"cannot read {str(p)!r}: {exc.strerror or exc}") from None
    if magic != b"\x93NUMPY":
        raise InputError(f"{str(p)!r} is not a .npy file (no NumPy header); for a text corpus give --format text "
                         "(or a .txt name), for token ids an array saved with numpy.save")
    try:
        arr = np.load(p, mmap_mode="r", allow_pickle=False)
    except ValueError as exc:
        if "pickle" in str(exc) or "Python objects" in str(exc):
            raise InputError(f"{str(p)!r} holds Python objects, not token ids; save an integer array with numpy.save") from None
        raise InputError(f"cannot read {str(p)!r} as a .npy array of token ids: {exc}") from None
    except OSError as exc:
        raise InputError(f"cannot read {str(p)!r} as a .npy array of token ids: {exc}") from None
    if not np.issubdtype(arr.dtype, np.integer):
        raise InputError(f"{str(p)!r} holds {arr.dtype} values; token ids must be integers")
    return arr.reshape(-1) if arr.ndim != 1 else arr


def _check_ids(ids: np.ndarray, n_used: int, vocab: int | None, p: Path) -> None:
    lo, hi = None, None
    for s in range(0, n_used, _CHUNK):
        chunk = np.asarray(ids[s : min(s + _CHUNK, n_used)])
        cl, ch = int(chunk.min()), int(chunk.max())
        lo, hi = cl if lo is None else min(lo, cl), ch if hi is None else max(hi, ch)
    if lo < 0 or (vocab is not None and hi >= vocab):
        raise InputError(
            f"{str(p)!r} holds token ids {lo}..{hi} outside the model's vocabulary 0..{(vocab or 0) - 1} (d_vocab={vocab})"
        )


def _fingerprint(ids: np.ndarray, n_used: int, seq_len: int) -> str:
    h = hashlib.sha256(f"seq_len={seq_len};n={n_used};".encode())
    for s in range(0, n_used, _CHUNK):
        h.update(np.ascontiguousarray(ids[s : min(s + _CHUNK, n_used)], dtype="<i8").tobytes())
    return h.hexdigest()
