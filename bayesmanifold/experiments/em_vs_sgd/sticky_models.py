"""The TransformerLens models that the sticky-chain experiments build (Paper II, arXiv 2512.22473).

Both take float inputs ``[batch, pos, 20]`` (the chain's noisy 20-d observations) instead of
tokens, and both are ordinary TransformerLens modules, so :func:`bayesmanifold.hooks.capture`
and every analysis attach to them:

* :class:`SingleHeadHooked`: Paper II's single causal head (section 5.2) as a
  ``HookedRootModule`` with TransformerLens hook names (``blocks.0.attn.hook_q`` ...), built from
  the four weight matrices of a run of :mod:`bayesmanifold.experiments.em_vs_sgd`.
* :class:`DeepStickyModel`: the released script's deep variant, an input projection
  20 → ``d_model`` in front of a pre-LN ``HookedTransformer`` entered at layer 0 (no token or
  positional embedding, as in the released model).

This module imports TransformerLens at import time; :mod:`bayesmanifold.hooks` does not import it.
"""

import math

import torch
from jaxtyping import Float
from torch import Tensor, nn

from ...backends.hooked import hooked_transformer_classes, tl_hook_classes
from ...errors import InputError

HookPoint, HookedRootModule = tl_hook_classes()

__all__ = ["SingleHeadHooked", "DeepStickyModel"]


class _Attention(nn.Module):
    def __init__(self, W_Q: Tensor, W_K: Tensor, W_V: Tensor) -> None:
        super().__init__()
        self.W_Q = nn.Parameter(W_Q.detach().clone())
        self.W_K = nn.Parameter(W_K.detach().clone())
        self.W_V = nn.Parameter(W_V.detach().clone())
        self.attn_scale = math.sqrt(W_Q.shape[-1])
        self.hook_q = HookPoint()
        self.hook_k = HookPoint()
        self.hook_v = HookPoint()
        self.hook_attn_scores = HookPoint()
        self.hook_pattern = HookPoint()
        self.hook_z = HookPoint()

    def forward(self, x: Float[Tensor, "batch pos d_in"]) -> Float[Tensor, "batch pos head_index d_head"]:
        q = self.hook_q((x @ self.W_Q)[:, :, None, :])  # [batch, pos, head_index=1, d_head]
        k = self.hook_k((x @ self.W_K)[:, :, None, :])
        v = self.hook_v((x @ self.W_V)[:, :, None, :])
        scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / self.attn_scale
        n = x.shape[1]
        causal = torch.ones(n, n, dtype=torch.bool, device=x.device).triu(1)
        scores = self.hook_attn_scores(scores.masked_fill(causal, float("-inf")))
        pattern = self.hook_pattern(torch.softmax(scores, dim=-1))
        return self.hook_z(torch.einsum("bhqk,bkhd->bqhd", pattern, v))


class _Block(nn.Module):
    def __init__(self, attn: _Attention) -> None:
        super().__init__()
        self.attn = attn


class SingleHeadHooked(HookedRootModule):
    """Paper II's single causal head as a TransformerLens ``HookedRootModule``.

    Float input ``[batch, pos, d_in]``; hook points ``blocks.0.attn.hook_q``, ``hook_k``, ``hook_v``,
    ``hook_attn_scores`` (masked entries ``-inf``), ``hook_pattern``, ``hook_z`` in TL's shapes; no
    residual, no bias; logits ``z W_O``. Built from the four weight matrices of a run.

    Args:
        W_Q, W_K: ``[d_in, d_head]``; W_V: ``[d_in, d_v]``; W_O: ``[d_v, n_out]`` (copied).

    Example:
        >>> shapes = ((20, 10), (20, 10), (20, 15), (15, 8))
        >>> model = SingleHeadHooked(*(0.1 * torch.randn(*s) for s in shapes))
        >>> model(torch.randn(1, 5, 20)).shape
        torch.Size([1, 5, 8])
    """

    def __init__(self, W_Q: Tensor, W_K: Tensor, W_V: Tensor, W_O: Tensor) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([_Block(_Attention(W_Q, W_K, W_V))])
        self.W_O = nn.Parameter(W_O.detach().clone())
        self.setup()

    def forward(self, x: Float[Tensor, "batch pos d_in"]) -> Float[Tensor, "batch pos n_out"]:
        d_in = self.blocks[0].attn.W_Q.shape[0]
        if not torch.is_floating_point(x) or x.ndim != 3 or x.shape[-1] != d_in:
            raise InputError(f"SingleHeadHooked takes float inputs [batch, pos, {d_in}]; got {tuple(x.shape)} {x.dtype}")
        z = self.blocks[0].attn(x)
        return z[:, :, 0, :] @ self.W_O


class DeepStickyModel(nn.Module):
    """Input projection ``d_in → d_model``, then a pre-LN ``HookedTransformer`` started at layer 0.

    GELU MLP of width ``4·d_model``, ``d_head = d_model / n_heads``, ``n_ctx`` 2048, output size
    ``n_out``. The weights come from ``seed``: TransformerLens initialises from the global
    generator, so the model is built under ``torch.random.fork_rng`` seeded ``seed`` (the caller's
    random state is neither used nor changed). The input projection is drawn first, then the
    transformer.

    Example:
        >>> m = DeepStickyModel(n_layers=1, n_heads=2, d_model=16)
        >>> m(torch.randn(1, 5, 20)).shape
        torch.Size([1, 5, 8])
    """

    def __init__(
        self,
        *,
        n_layers: int = 4,
        n_heads: int = 4,
        d_model: int = 64,
        d_in: int = 20,
        n_out: int = 8,
        seed: int = 0,
        device: str | torch.device = "cpu",
    ) -> None:
        super().__init__()
        HookedTransformer, HookedTransformerConfig = hooked_transformer_classes()

        tl_cfg = HookedTransformerConfig(
            n_layers=n_layers,
            d_model=d_model,
            n_heads=n_heads,
            d_head=d_model // n_heads,
            d_mlp=4 * d_model,
            act_fn="gelu",
            normalization_type="LN",
            n_ctx=2048,
            d_vocab=n_out,
            d_vocab_out=n_out,
            seed=None,
            device=str(device),
        )
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.input_proj = nn.Linear(d_in, d_model)
            self.transformer = HookedTransformer(tl_cfg)
        self.to(device)

    def forward(self, x: Float[Tensor, "batch pos d_in"]) -> Float[Tensor, "batch pos n_out"]:
        return self.transformer(self.input_proj(x), start_at_layer=0)
