"""Key orthogonality: are the keys of the hypotheses nearly orthogonal frames?

Paper I (arXiv 2512.22471) reports, on the Bayesian wind tunnels, that the keys of the hypothesis
tokens become nearly orthogonal in layer 0 (mean off-diagonal cosine 0.09–0.12, against 0.40–0.45
for a random model). Paper III (arXiv 2512.23752) measures key orthogonality in pretrained LLMs as
the mean off-diagonal |cos| between the d_k columns of W_K per head.

Definitions (per layer and head, then summarised per layer):

- **Token-key orthogonality** (Paper I): for hypothesis tokens t_1..t_n,
  k_i = LN1_l(W_E[t_i]) W_K^{l,h} + b_K^{l,h}; the rows are ℓ2-normalised and the statistic is the
  mean *signed* off-diagonal cosine. The layer's first normalisation is applied to the bare token
  embedding (no positional embedding, which would add the same shift to every key); for layers > 0
  this is the embedding seen directly by that layer's keys, not the actual residual stream.
  ``include_bias=False`` leaves out b_K.
- **Column orthogonality** (Paper III): the d_head columns of W_K^{l,h} (vectors in d_model),
  ℓ2-normalised, mean off-diagonal |cos|.
- Under GQA the key weights are per kv head, so both statistics are reported per kv head.
- Baselines: the same statistic for i.i.d. Gaussian vectors of the same shape (seeded), and for a
  freshly initialised model of the same config (seeded; the global RNG is left untouched).

The weights come from the model-access layer (``key_weights``, ``token_embedding``,
``key_layer_norm``); no forward pass is run.
"""

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor

from ..backends import ModelLike, model_access
from ..errors import InputError

__all__ = ["mean_offdiag_cosine", "KeyOrthogonalityResult", "key_orthogonality"]


def mean_offdiag_cosine(vectors: Float[Tensor, "... n d"], absolute: bool = False) -> Float[Tensor, "..."]:
    """Mean off-diagonal cosine (or |cosine|) between the n rows of each [..., n, d] block.

    An orthonormal set gives 0, n identical vectors give 1. Needs n ≥ 2.
    """
    v = vectors.to(torch.float64)
    n = v.shape[-2]
    if n < 2:
        raise InputError(f"need at least 2 vectors for an off-diagonal mean, got {n}")
    vn = F.normalize(v, dim=-1, eps=1e-30)
    c = vn @ vn.transpose(-1, -2)
    if absolute:
        c = c.abs()
    off = c.sum((-1, -2)) - torch.diagonal(c, dim1=-2, dim2=-1).sum(-1)
    return off / (n * (n - 1))


def _token_keys(access: Any, layer: int, token_ids: Tensor, include_bias: bool) -> Tensor:
    """Keys [n_kv, n_tokens, d_head] of the bare token embeddings through the layer's first norm."""
    W, b = access.key_weights(layer)
    with torch.no_grad():
        W_E = access.token_embedding()
        x = W_E[token_ids.to(W_E.device)].unsqueeze(0)
        ln = access.key_layer_norm(layer)
        if ln is not None:
            x = ln(x)
        x = x[0].to(W.dtype)
        k = torch.einsum("nd,hde->hne", x, W)
        if include_bias and b is not None:
            k = k + b[:, None, :]
    return k.to(torch.float64).cpu()


def _orth_stats(access: Any, layers: list[int], definition: str, token_ids: Tensor | None, include_bias: bool, absolute: bool) -> np.ndarray:
    rows = []
    for layer in layers:
        if definition == "tokens":
            k = _token_keys(access, layer, token_ids, include_bias)  # [kv, n, d_head]
            rows.append(mean_offdiag_cosine(k, absolute=absolute).numpy())
        else:
            W, _ = access.key_weights(layer)  # [kv, d_model, d_head]
            rows.append(mean_offdiag_cosine(W.transpose(1, 2).to(torch.float64).cpu(), absolute=absolute).numpy())
    return np.stack(rows)


@dataclass(frozen=True, eq=False)
class KeyOrthogonalityResult:
    """Key orthogonality per layer and (kv) head, with baselines.

    Attributes:
        definition: "tokens" (Paper I: mean signed off-diagonal cosine of hypothesis-token keys)
            or "columns" (Paper III: mean off-diagonal |cos| of the d_head columns of W_K).
        layers: the layer indices of the rows.
        per_head: [n_layers_selected, n_kv_heads] statistic.
        gaussian: the statistic for i.i.d. Gaussian vectors of the same shape (mean of draws).
        random_init: [n_layers_selected, n_kv_heads] for a fresh model of the same config, or None.
        absolute: whether |cos| (True) or the signed cosine (False) was averaged.
    """

    definition: str
    layers: list[int]
    per_head: np.ndarray
    gaussian: float
    random_init: np.ndarray | None = None
    absolute: bool | None = None

    @property
    def per_layer(self) -> np.ndarray:
        """Mean over heads, one value per selected layer."""
        return self.per_head.mean(1)

    @property
    def random_init_per_layer(self) -> np.ndarray | None:
        return None if self.random_init is None else self.random_init.mean(1)

    def to_dataframe(self):
        """One row per (layer, kv head): the statistic and both baselines."""
        import pandas as pd

        rows = []
        for i, layer in enumerate(self.layers):
            for h in range(self.per_head.shape[1]):
                rows.append(
                    {
                        "layer": layer,
                        "head": h,
                        "definition": self.definition,
                        "key_orthogonality": float(self.per_head[i, h]),
                        "gaussian_baseline": self.gaussian,
                        "random_init_baseline": None if self.random_init is None else float(self.random_init[i, h]),
                    }
                )
        return pd.DataFrame(rows)

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe: per head and per layer, with both baselines."""
        return {
            "definition": self.definition,
            "absolute": self.absolute,
            "layers": [int(x) for x in self.layers],
            "per_head": self.per_head.tolist(),
            "per_layer": self.per_layer.tolist(),
            "gaussian": float(self.gaussian),
            "random_init": None if self.random_init is None else self.random_init.tolist(),
            "random_init_per_layer": None if self.random_init is None else self.random_init_per_layer.tolist(),
        }

    def plot(self, ax=None):
        """Per-layer statistic against the random-init and Gaussian baselines."""
        import matplotlib.pyplot as plt

        if ax is None:
            _, ax = plt.subplots(figsize=(5, 3.5))
        ax.plot(self.layers, self.per_layer, "o-", label="trained")
        if self.random_init is not None:
            ax.plot(self.layers, self.random_init_per_layer, "s--", label="random init")
        ax.axhline(self.gaussian, color="gray", ls=":", label="Gaussian")
        ax.set_xlabel("layer")
        ax.set_ylabel("mean off-diagonal " + ("cos" if self.definition == "tokens" else "|cos|"))
        ax.set_title(f"key orthogonality ({self.definition})", fontsize=9)
        ax.legend(fontsize=8)
        return ax


def key_orthogonality(
    model: ModelLike,
    *,
    definition: Literal["tokens", "columns"] = "tokens",
    token_ids: Sequence[int] | Int[Tensor, " n"] | None = None,
    layers: Iterable[int] | int | None = None,
    include_bias: bool = True,
    random_init_baseline: bool = True,
    seed: int = 0,
    n_gaussian_draws: int = 8,
    absolute: bool | None = None,
) -> KeyOrthogonalityResult:
    """Key orthogonality (see the module docstring for both definitions) with baselines.

    Args:
        model: a HookedTransformer.
        definition: "tokens" (hypothesis-token keys; needs ``token_ids``) or "columns" (W_K columns).
        token_ids: the hypothesis tokens (e.g. the V key tokens of the bijection task).
        layers: which layers (None: all).
        include_bias: add b_K to the token keys.
        random_init_baseline: also measure a fresh model of the same config (seeded).
        seed: seed of both baselines.
        n_gaussian_draws: Gaussian draws averaged for the Gaussian baseline.
        absolute: average |cos| instead of cos (default: False for "tokens", True for "columns",
            as in Papers I and III).

    Example:
        >>> key_orthogonality(model, token_ids=range(20), layers=0).per_layer  # doctest: +SKIP
    """
    access = model_access(model)
    layer_list = access.norm_layers(layers)
    if definition not in ("tokens", "columns"):
        raise InputError(f"definition must be 'tokens' or 'columns', got {definition!r}")
    tok = None
    if definition == "tokens":
        if token_ids is None:
            raise InputError("definition='tokens' needs token_ids (the hypothesis tokens)")
        tok = torch.as_tensor(list(token_ids) if not isinstance(token_ids, Tensor) else token_ids).long().reshape(-1)
        if tok.numel() < 2:
            raise InputError(f"need at least 2 hypothesis tokens, got {tok.numel()}")
        if int(tok.min()) < 0 or int(tok.max()) >= access.d_vocab:
            raise InputError(f"token_ids must lie in 0..{access.d_vocab - 1}")
    absolute = (definition == "columns") if absolute is None else bool(absolute)
    per_head = _orth_stats(access, layer_list, definition, tok, include_bias, absolute)
    gen = torch.Generator().manual_seed(seed)
    if definition == "tokens":
        shape = (n_gaussian_draws, tok.numel(), access.d_head)
    else:
        shape = (n_gaussian_draws, access.d_head, access.d_model)
    gauss = float(mean_offdiag_cosine(torch.randn(shape, generator=gen, dtype=torch.float64), absolute=absolute).mean())
    rnd = None
    if random_init_baseline:
        fresh_model = access.fresh_copy(seed=seed)  # held while its backend is used (a backend refers to it weakly)
        rnd = _orth_stats(model_access(fresh_model), layer_list, definition, tok, include_bias, absolute)
        del fresh_model
    return KeyOrthogonalityResult(
        definition=definition, layers=layer_list, per_head=per_head, gaussian=gauss, random_init=rnd, absolute=absolute
    )
