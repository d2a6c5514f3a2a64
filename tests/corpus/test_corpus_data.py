"""Reading and packing a corpus: formats, documented order, and every bad input."""

import json
import os
import socket

import numpy as np
import pytest
import torch

from bayesmanifold.backends import Backend
from bayesmanifold.corpus.data import detect_format, read_corpus, split_range
from bayesmanifold.errors import InputError


class _Access(Backend):
    """A backend with the three facts the reader asks of a model: tokenizer, d_vocab, to_tokens
    (encode and the byte fallback are the base class's)."""

    def __init__(self, tokenizer=None, d_vocab=256):
        self._tokenizer, self._d_vocab = tokenizer, d_vocab

    tokenizer = property(lambda self: self._tokenizer)
    d_vocab = property(lambda self: self._d_vocab)

    def to_tokens(self, text):  # a "tokenizer": BOS (0) then one id per character, mod 100
        return torch.tensor([[0] + [1 + ord(c) % 99 for c in text]])


def test_text_directory_is_read_in_sorted_order_as_utf8_bytes(tmp_path):
    d = tmp_path / "corpus"
    (d / "b").mkdir(parents=True)
    (d / "b" / "x.txt").write_text("BBBB")
    (d / "a.txt").write_text("AAAA")
    (d / ".hidden").write_text("HHHH")
    (d / "__pycache__").mkdir()
    (d / "__pycache__" / "a.cpython-311.pyc").write_bytes(b"\xa7\r\r\n\x00")  # bytecode, not UTF-8
    (d / "c.txt").write_text("")  # empty documents add nothing
    s = read_corpus(d, _Access(), seq_len=3)
    assert s.format == "text" and s.tokenization == "utf8-bytes" and s.n_documents == 3
    assert bytes(s.tokens.tolist()) == b"AAAABBBB"  # a.txt, then b/x.txt; hidden files and __pycache__ skipped
    assert s.n_sequences == 2 and s.n_used == 6  # the tail shorter than a window is dropped
    assert s.window(0, 2).tolist() == [list(b"AAA"), list(b"ABB")]


def test_tokenizer_jsonl_and_max_tokens(tmp_path):
    f = tmp_path / "docs.jsonl"
    f.write_text("\n".join(json.dumps({"text": t, "id": i}) for i, t in enumerate(["ab", "", "cde"])) + "\n\n")
    s = read_corpus(f, _Access(tokenizer=object(), d_vocab=100), seq_len=2)
    assert s.format == "jsonl" and s.tokenization == "tokenizer" and s.n_documents == 3
    assert s.tokens.tolist() == [0, 98, 99, 0, 1, 2, 3]  # BOS per document, documents in file order
    assert s.n_sequences == 3
    short = read_corpus(f, _Access(tokenizer=object(), d_vocab=100), seq_len=2, max_tokens=5)
    assert short.n_sequences == 2 and short.fingerprint != s.fingerprint


def test_npy_tokens_memory_mapped_1d_and_2d(tmp_path):
    ids = np.arange(40, dtype=np.int16) % 50
    np.save(tmp_path / "t.npy", ids)
    np.save(tmp_path / "t2.npy", ids.reshape(4, 10))
    a = read_corpus(tmp_path / "t.npy", _Access(d_vocab=50), seq_len=8)
    b = read_corpus(tmp_path / "t2.npy", _Access(d_vocab=50), seq_len=8)
    assert isinstance(a.tokens, np.memmap) and a.tokenization == "token-ids"
    assert a.n_sequences == 5 and a.fingerprint == b.fingerprint  # 2-D arrays are read row-major
    assert a.window(1, 2).tolist() == [list(range(8, 16))]


def test_split_range_blocks_are_contiguous_and_balanced():
    blocks = [split_range(3, 13, 3, i) for i in range(3)]
    assert blocks == [(3, 7), (7, 10), (10, 13)]
    assert detect_format("x.npy") == "tokens" and detect_format("x.jsonl") == "jsonl" and detect_format("x.md") == "text"


def test_bad_corpora_raise_one_clear_error(tmp_path):
    acc = _Access()
    with pytest.raises(InputError, match="does not exist"):
        read_corpus(tmp_path / "missing.txt", acc, seq_len=4)
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(InputError, match="empty"):
        read_corpus(tmp_path / "empty.txt", acc, seq_len=4)
    (tmp_path / "short.txt").write_text("abc")
    with pytest.raises(InputError, match="fewer than one window"):
        read_corpus(tmp_path / "short.txt", acc, seq_len=4)
    (tmp_path / "emptydir").mkdir()
    with pytest.raises(InputError, match="empty"):
        read_corpus(tmp_path / "emptydir", acc, seq_len=4)
    (tmp_path / "latin1.txt").write_bytes("caf\xe9 au lait".encode("latin-1"))
    with pytest.raises(InputError, match=r"not UTF-8 .*0xe9 at offset 3"):
        read_corpus(tmp_path / "latin1.txt", acc, seq_len=2)
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"txt": 1}\n')
    with pytest.raises(InputError, match="line 2 has no string field"):
        read_corpus(tmp_path / "bad.jsonl", acc, seq_len=2)
    (tmp_path / "broken.jsonl").write_text('{"text": "ok"\n')
    with pytest.raises(InputError, match="line 1 is not JSON"):
        read_corpus(tmp_path / "broken.jsonl", acc, seq_len=2)
    np.save(tmp_path / "big.npy", np.array([1, 2, 300, 4]))
    with pytest.raises(InputError, match=r"token ids 1\.\.300 outside the model's vocabulary 0\.\.255"):
        read_corpus(tmp_path / "big.npy", acc, seq_len=2)
    np.save(tmp_path / "neg.npy", np.array([1, -2, 3, 4]))
    with pytest.raises(InputError, match="outside the model's vocabulary"):
        read_corpus(tmp_path / "neg.npy", acc, seq_len=2)
    np.save(tmp_path / "float.npy", np.zeros(8))
    with pytest.raises(InputError, match="must be integers"):
        read_corpus(tmp_path / "float.npy", acc, seq_len=2)
    (tmp_path / "text.txt").write_text("hello world")
    with pytest.raises(InputError, match="no tokenizer and its vocabulary"):
        read_corpus(tmp_path / "text.txt", _Access(d_vocab=50), seq_len=2)


def test_unreadable_file(tmp_path):
    f = tmp_path / "secret.txt"
    if os.geteuid() != 0:
        f.write_text("some text here")
        f.chmod(0)
    else:  # root reads any file whatever its mode; a socket cannot be opened as a file by anyone
        sock = socket.socket(socket.AF_UNIX)
        sock.bind(str(f))
        sock.close()
    try:
        with pytest.raises(InputError, match="cannot read"):
            read_corpus(f, _Access(), seq_len=2)
    finally:
        f.chmod(0o644)
