"""How a backend turns what a user passes (token ids, text, a :class:`Batch`) into a checked
:class:`Batch` on the model's device: text through the tokenizer, or as UTF-8 bytes for a model
whose vocabulary covers them, written once for every caller.

:class:`InputsMixin` is part of :class:`~.base.Backend`; it reads only the backend's facts
(``tokenizer``, ``d_vocab``, ``n_ctx``, ``device``) and its model's ``to_tokens``.
"""

from dataclasses import replace
from typing import Any

import numpy as np
import torch
from jaxtyping import Int
from torch import Tensor

from ..errors import InputError
from .batch import Batch

__all__ = ["InputsMixin"]


class InputsMixin:
    """Token ids, text and batches, checked against the model's vocabulary and context."""

    @property
    def text_encoding(self) -> str | None:
        """How text becomes token ids: ``"tokenizer"``, ``"utf8-bytes"`` (no tokenizer, but the
        vocabulary covers the 256 byte values, as our byte-level models) or None (it cannot)."""
        if self.tokenizer is not None:
            return "tokenizer"
        return "utf8-bytes" if (self.d_vocab or 0) >= 256 else None

    def _no_text(self) -> InputError:
        return InputError(
            f"got text but the model has no tokenizer (and its vocabulary of {self.d_vocab} does not cover the "
            "256 byte values); give token ids, or a tokenizer: --tokenizer DIR on the command line, "
            "load_model(..., tokenizer=DIR) in the library"
        )

    def to_tokens(self, text: str | list[str]) -> Int[Tensor, "batch pos"]:
        """Token ids of text through the model's tokenizer (TransformerLens's ``to_tokens``, never truncated)."""
        if self.tokenizer is None:
            raise self._no_text()
        return self.model.to_tokens(text, truncate=False)  # TL would truncate to n_ctx silently

    def encode(self, text: str) -> Int[Tensor, " pos"]:
        """Token ids ``[pos]`` (int64, CPU) of one text: the tokenizer's (with its BOS, as
        ``to_tokens``), else the UTF-8 bytes for a byte-vocabulary model (:attr:`text_encoding`).

        Raises:
            InputError: the model can read neither (no tokenizer, vocabulary under 256).
        """
        how = self.text_encoding
        if how == "tokenizer":
            return self.to_tokens(text)[0].cpu().long()
        if how == "utf8-bytes":
            return torch.frombuffer(bytearray(text.encode("utf-8")), dtype=torch.uint8).long()
        raise self._no_text()

    def as_tokens(self, tokens: Any) -> Int[Tensor, "batch pos"]:
        """Token ids ``[batch, pos]`` (int64) from ids of any integer dtype or text; checked against the vocabulary and n_ctx."""
        if isinstance(tokens, str) or (isinstance(tokens, list) and tokens and isinstance(tokens[0], str)):
            tokens = self.to_tokens(tokens)
        t = torch.as_tensor(tokens)
        if t.dim() == 1:
            t = t.unsqueeze(0)
        if t.dim() != 2 or t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
            raise InputError(f"tokens must be an integer tensor [batch, pos], got dtype {t.dtype} shape {tuple(t.shape)}")
        if t.numel() == 0:
            raise InputError("tokens are empty; expected token ids of shape [batch, pos]")
        if self.n_ctx is not None and t.shape[1] > self.n_ctx:
            raise InputError(f"tokens have {t.shape[1]} positions but the model's context is n_ctx={self.n_ctx}")
        vocab = self.d_vocab
        lo, hi = int(t.min()), int(t.max())
        if lo < 0 or (vocab is not None and hi >= vocab):
            raise InputError(f"token ids must lie in 0..{vocab - 1 if vocab else '?'} (d_vocab={vocab}); got range {lo}..{hi}")
        return t.long()

    def text_to_tokens(self, text: str | list[str]) -> tuple[Int[Tensor, "batch pos"], Tensor | None]:
        """Token ids of one string, or of a list of strings right-padded with their attention mask.

        Each string is tokenised alone (so padding never enters a sequence) and the mask marks the
        real tokens: pad tokens then enter neither the loss nor any statistic.
        """
        if isinstance(text, str):
            return self.encode(text)[None].to(self.device), None
        rows = [self.encode(s) for s in text]
        n = max(len(r) for r in rows)
        if all(len(r) == n for r in rows):
            return torch.stack(rows), None
        pad = getattr(self.tokenizer, "pad_token_id", None)
        pad = 0 if pad is None else int(pad)
        tokens = torch.full((len(rows), n), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), n), dtype=torch.long)
        for i, r in enumerate(rows):
            tokens[i, : len(r)] = r
            mask[i, : len(r)] = 1
        return tokens, mask

    def prepare_batch(self, inputs: Any, attention_mask: Tensor | None = None) -> Batch:
        """A :class:`Batch` on the model's device from a Batch, token ids, text or float inputs, checked."""
        access = self
        device = access.device
        if isinstance(inputs, Batch):
            if attention_mask is not None:
                raise InputError("give the attention mask inside the Batch, not beside it")
            batch = inputs
            inputs, attention_mask = batch.tokens, batch.attention_mask
        else:
            batch = None
        if isinstance(inputs, str) or (isinstance(inputs, list) and inputs and isinstance(inputs[0], str)):
            if attention_mask is not None:
                raise InputError("text input gets its attention mask from the tokenizer; do not pass one")
            inputs, attention_mask = access.text_to_tokens(inputs)
        if isinstance(inputs, np.ndarray):
            inputs = torch.from_numpy(inputs)
        if not isinstance(inputs, Tensor):
            raise InputError(f"inputs must be a tensor of token ids, a Batch or a string, got {type(inputs).__name__}")
        if not torch.is_floating_point(inputs):
            inputs = access.as_tokens(inputs)
        elif inputs.numel() == 0:
            raise InputError("inputs are empty; expected a float tensor of shape [batch, pos, d]")
        inputs = inputs.to(device)
        if attention_mask is not None:
            if not isinstance(attention_mask, Tensor) or tuple(attention_mask.shape) != tuple(inputs.shape[:2]):
                got = tuple(attention_mask.shape) if isinstance(attention_mask, Tensor) else type(attention_mask).__name__
                raise InputError(f"attention_mask must have shape {tuple(inputs.shape[:2])} (batch, pos), got {got}")
            attention_mask = attention_mask.to(device)
        if batch is None:
            return Batch(tokens=inputs, attention_mask=attention_mask)
        return replace(batch, tokens=inputs, attention_mask=attention_mask, labels=dict(batch.labels))



