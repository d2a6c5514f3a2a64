"""Byte-level BPE for the text corpus, trained with HuggingFace ``tokenizers`` on the training files.

Byte-level (GPT-2's scheme): the text is first mapped to the 256 byte symbols, so every file is
encodable and decoding gives the bytes back; merges are learned on the training files only (the
held-out files never shape the vocabulary). Id 0 is the special token ``<|endoftext|>``, written
between files. Training is deterministic for a given file list and ``tokenizers`` version; a
checkpoint saves its tokenizer (``tokenizer/``) so that a model is always read with the exact
vocabulary it was trained on (:func:`save_tokenizer`, loaded by the model-access layer).
"""

import json
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import TaskError
from ..io import atomic_write_text, ensure_dir

__all__ = ["EOT", "MIN_VOCAB", "train_bpe", "encode_documents", "save_tokenizer", "tokenizer_description"]

EOT = "<|endoftext|>"
MIN_VOCAB = 257 + 1  # the 256 byte symbols, the end-of-text token and at least one merge


def train_bpe(texts: list[str], vocab_size: int) -> Any:
    """A byte-level BPE of ``vocab_size`` tokens (``<|endoftext|>`` = id 0) learned from ``texts``."""
    try:
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    except ImportError as exc:  # installed with transformers, which TransformerLens requires
        raise TaskError(f"a BPE vocabulary needs the 'tokenizers' package: {exc}") from None
    if vocab_size < MIN_VOCAB:
        raise TaskError(f"bpe_vocab must be 0 (bytes) or at least {MIN_VOCAB}, got {vocab_size}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOT], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    return tok


def encode_documents(tok: Any, texts: list[str]) -> np.ndarray:
    """Token ids of ``texts`` concatenated in order, each document followed by ``<|endoftext|>``."""
    eot = tok.token_to_id(EOT)
    parts = []
    for enc in tok.encode_batch(texts):
        parts += [np.asarray(enc.ids, dtype=np.int64), np.array([eot], dtype=np.int64)]
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


def tokenizer_description(tok: Any) -> str:
    import tokenizers

    return (f"byte-level BPE, {tok.get_vocab_size()} tokens (tokenizers {tokenizers.__version__}), "
            f"trained on the training files; {EOT} (id 0) between files")


def save_tokenizer(tok: Any, directory: "str | Path") -> Path:
    """Write ``tokenizer.json`` and a ``tokenizer_config.json`` that HuggingFace's AutoTokenizer
    reads (``<|endoftext|>`` as BOS, EOS and padding), each under a temporary name then renamed.
    No ``model_max_length``: the commands check prompts against the model's n_ctx themselves, and
    documents longer than the context are tokenised whole before a scan cuts them."""
    d = ensure_dir(directory)
    atomic_write_text(d / "tokenizer.json", tok.to_str())
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": EOT, "eos_token": EOT,
              "pad_token": EOT, "unk_token": None, "add_prefix_space": False}
    atomic_write_text(d / "tokenizer_config.json", json.dumps(config, indent=2))
    return d
