"""Attention-free baselines of Paper I (arXiv 2512.22471): an LSTM and a causal MLP.

Both take tokens ``[batch, pos]`` and return logits ``[batch, pos, d_vocab]``, like a
``HookedTransformer``, so the same training loop and calibration code apply.

* :class:`LSTMModel`: embedding → ``n_layers`` stacked LSTM of hidden size ``d_model`` → linear
  unembedding (the paper's "same depth and width").
* :class:`CausalMLP`: no attention and no recurrence. Position ``t`` sees its own token
  embedding, a learned position embedding and — with ``context="mean"`` (default) — the causal
  *mean* of a second embedding over the prefix ``x_1..x_t`` (a normalised bag of tokens). A
  stack of pre-norm residual MLP blocks (GELU, width ``d_mlp``) follows. The bag is the choice
  here because it is the strongest order-free summary a per-position MLP can get without
  attention: it carries the *set* of tokens seen (enough, in principle, for bijection
  elimination) but no order or binding of which key went with which value. ``context="none"``
  gives the purely per-position MLP (token + position only), whose best bijection answer is
  the uniform over all V values (entropy MAE log2 V − mean_t log2(V−t+1) = 1.11 bits at V=20,
  the paper's lower MLP figure).
"""

import torch
from jaxtyping import Float, Int
from torch import Tensor, nn

__all__ = ["LSTMModel", "CausalMLP"]


class LSTMModel(nn.Module):
    """Embedding → stacked LSTM → linear readout.

    Args:
        d_vocab: vocabulary size.
        d_model: embedding and hidden size.
        n_layers: stacked LSTM layers.
    """

    def __init__(self, d_vocab: int, d_model: int, n_layers: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(d_vocab, d_model)
        self.lstm = nn.LSTM(d_model, d_model, num_layers=n_layers, batch_first=True)
        self.unembed = nn.Linear(d_model, d_vocab)

    def forward(self, tokens: Int[Tensor, "batch pos"]) -> Float[Tensor, "batch pos d_vocab"]:
        h, _ = self.lstm(self.embed(tokens))
        return self.unembed(h)


class _Block(nn.Module):
    def __init__(self, d_model: int, d_mlp: int) -> None:
        super().__init__()
        self.norm = nn.RMSNorm(d_model)
        self.fc1 = nn.Linear(d_model, d_mlp)
        self.fc2 = nn.Linear(d_mlp, d_model)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.fc2(torch.nn.functional.gelu(self.fc1(self.norm(x))))


class CausalMLP(nn.Module):
    """Attention-free per-position MLP over token, position and a causal bag of the prefix.

    Args:
        d_vocab: vocabulary size.
        d_model: residual width.
        d_mlp: hidden width of each MLP block.
        n_layers: number of residual MLP blocks.
        n_ctx: maximum sequence length (learned positions).
        context: ``"mean"`` (causal mean of prefix embeddings is added) or ``"none"``.
    """

    def __init__(self, d_vocab: int, d_model: int, d_mlp: int, n_layers: int, n_ctx: int,
                 context: str = "mean") -> None:
        super().__init__()
        self.context = context
        self.embed = nn.Embedding(d_vocab, d_model)
        self.pos = nn.Embedding(n_ctx, d_model)
        self.bag = nn.Embedding(d_vocab, d_model) if context == "mean" else None
        self.blocks = nn.ModuleList([_Block(d_model, d_mlp) for _ in range(n_layers)])
        self.norm = nn.RMSNorm(d_model)
        self.unembed = nn.Linear(d_model, d_vocab)

    def forward(self, tokens: Int[Tensor, "batch pos"]) -> Float[Tensor, "batch pos d_vocab"]:
        P = tokens.shape[1]
        x = self.embed(tokens) + self.pos(torch.arange(P, device=tokens.device))
        if self.bag is not None:
            counts = torch.arange(1, P + 1, device=tokens.device, dtype=x.dtype)[:, None]
            x = x + self.bag(tokens).cumsum(dim=1) / counts
        for block in self.blocks:
            x = block(x)
        return self.unembed(self.norm(x))
