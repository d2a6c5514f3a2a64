"""The single causal head of Paper II's experiment, differentiated by hand and batched over runs.

Model (as specified): ``W_Q, W_K ∈ R^{20×10}``, ``W_V ∈ R^{20×15}``, ``W_O ∈ R^{15×8}``, all
``0.1·N(0,1)`` from a generator seeded with the run's seed (the released script's stream:
``randn`` for Q, K, V, O in that order); scores ``QKᵀ/√10``, causal softmax, no residual, logits
``(αV)W_O``, mean cross-entropy over the 1999 positions, full batch. Every run of a table is a
row of one batch (``torch.bmm``), and the forward and backward passes are written out by hand,
tiled over query blocks so that only the causal half of the score matrix is computed; the tests
check the gradients against autograd.

The closed-form M-step control (:func:`m_step_values`) is also here: with ``α``, ``W_Q, W_K, W_O``
held, each value gets the responsibility-normalised target
``v*_j = v_j - η_M · Σ_i α_ij ũ_i / Σ_i α_ij`` and ``W_V`` is the least-squares solution of
``X W_V = V*``.
"""

import math
from dataclasses import dataclass

import torch
from jaxtyping import Float, Int
from torch import Tensor

from .config import D_HEAD, D_IN, D_VALUE, N_STATES

__all__ = ["init_weights", "attention_forward_backward", "m_step_values"]


def init_weights(seed: int, *, scale: float = 0.1) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``W_Q, W_K [20, 10]``, ``W_V [20, 15]``, ``W_O [15, 8]`` as ``scale · N(0, 1)``.

    Drawn in that order from a generator seeded ``seed``: the same numbers as the released
    script's ``torch.manual_seed(seed); randn_like(...)`` sequence.
    """
    g = torch.Generator().manual_seed(int(seed))
    shapes = ((D_IN, D_HEAD), (D_IN, D_HEAD), (D_IN, D_VALUE), (D_VALUE, N_STATES))
    return tuple(torch.randn(*s, generator=g) * scale for s in shapes)  # type: ignore[return-value]


@dataclass
class _Pass:
    loss: Tensor  # [B]
    entropy: Tensor  # [B] nats
    accuracy: Tensor  # [B]
    grads: tuple[Tensor, Tensor, Tensor, Tensor]
    resp_u: Tensor | None  # [Bm, T, d_v] Σ_i α_ij u_i (mean-loss u) for the M-step rows
    resp_mass: Tensor | None  # [Bm, T] Σ_i α_ij


def attention_forward_backward(
    X: Float[Tensor, "batch pos d_in"],
    y: Int[Tensor, "batch pos"],
    W_Q: Float[Tensor, "batch d_in d_head"],
    W_K: Float[Tensor, "batch d_in d_head"],
    W_V: Float[Tensor, "batch d_in d_v"],
    W_O: Float[Tensor, "batch d_v n_out"],
    *,
    tile: int = 64,
    responsibility_rows: Tensor | None = None,
) -> _Pass:
    """Loss, predictive entropy, accuracy and exact gradients of a batch of single-head models.

    A hand-written, tiled forward and backward pass of the causal single head (one model per
    batch row): for each block of queries only the keys up to the block's end are touched.
    The weight gradients use ``∂L/∂W_Q = (Xᵀ G_S X) W_K / √d``, ``∂L/∂W_K = (Xᵀ G_S X)ᵀ W_Q / √d``
    with ``G_S = α ⊙ (b - b̄)`` (the routing law), and ``∂L/∂W_V = (αX)ᵀ U``.

    Args:
        responsibility_rows: batch rows for which ``Σ_i α_ij u_i`` and ``Σ_i α_ij`` are also
            returned (needed by the closed-form M-step).
    """
    B, T, d = X.shape
    scale = math.sqrt(W_Q.shape[-1])
    Q = torch.bmm(X, W_Q / scale)
    # keys and values as columns [batch, d, pos]: the block products read them without a transpose
    Kt = torch.bmm(X, W_K).transpose(1, 2).contiguous()
    Vt = torch.bmm(X, W_V).transpose(1, 2).contiguous()
    g_O = torch.zeros_like(W_O)
    g_V = torch.zeros_like(W_V)
    C = X.new_zeros(B, d, d)
    logits_all = X.new_empty(B, T, W_O.shape[-1])  # the per-position metrics are reduced once, after the loop
    neg = torch.full((tile, tile), float("-inf"), dtype=X.dtype, device=X.device).triu(1)
    minus_one = torch.full((B, tile, 1), -1.0, dtype=X.dtype, device=X.device)
    rr = responsibility_rows
    resp_u = resp_mass = None
    if rr is not None and rr.numel():
        resp_u = X.new_zeros(rr.numel(), T, W_V.shape[-1])
        resp_mass = X.new_zeros(rr.numel(), T)
    for a in range(0, T, tile):
        b = min(a + tile, T)
        n = b - a
        S = torch.bmm(Q[:, a:b], Kt[:, :, :b])
        S[:, :, a:b] += neg[:n, :n]
        A = torch.softmax(S, -1)
        del S
        AX = torch.bmm(A, X[:, :b])
        Z = torch.bmm(AX, W_V)
        logits = torch.bmm(Z, W_O, out=logits_all[:, a:b])
        G = torch.softmax(logits, -1).scatter_add_(2, y[:, a:b, None], minus_one[:, :n]).div_(T)  # (p − onehot(y)) / T
        GZ = torch.bmm(G, W_O.transpose(1, 2))  # u_i = ∂L/∂z_i
        g_O += torch.bmm(Z.transpose(1, 2), G)
        g_V += torch.bmm(AX.transpose(1, 2), GZ)
        bbar = (GZ * Z).sum(-1, keepdim=True)  # b̄_i = Σ_j α_ij u_i·v_j = u_i·z_i
        GA = torch.bmm(GZ, Vt[:, :, :b])  # b_ij = u_i·v_j
        # G_S X = (α ⊙ b) X - b̄ (αX): saves one pass over the block
        GSX = torch.bmm(GA.mul_(A), X[:, :b]).sub_(bbar * AX)
        C += torch.bmm(X[:, a:b].transpose(1, 2), GSX)
        if resp_u is not None:
            Am = A.index_select(0, rr)
            resp_u[:, :b] += torch.bmm(Am.transpose(1, 2), GZ.index_select(0, rr))
            resp_mass[:, :b] += Am.sum(1)
    logp_all = torch.log_softmax(logits_all, -1)
    loss = -logp_all.gather(2, y[..., None]).squeeze(-1).sum(1, dtype=torch.float64)
    ent = -(logp_all.exp() * logp_all).sum((1, 2), dtype=torch.float64)
    acc = (logits_all.argmax(-1) == y).sum(1, dtype=torch.float64)
    g_Q = torch.bmm(C, W_K) / scale
    g_K = torch.bmm(C.transpose(1, 2), W_Q) / scale
    return _Pass(loss / T, ent / T, acc / T, (g_Q, g_K, g_V, g_O), resp_u, resp_mass)


def m_step_values(
    X: Float[Tensor, "batch pos d_in"],
    W_V: Float[Tensor, "batch d_in d_v"],
    resp_u: Float[Tensor, "batch pos d_v"],
    resp_mass: Float[Tensor, "batch pos"],
    step: "float | Tensor",
    *,
    pinv: Tensor | None = None,
) -> Float[Tensor, "batch d_in d_v"]:
    """The closed-form M-step for the values: least-squares ``W_V`` for the normalised targets.

    Targets ``v*_j = x_j W_V - step · T · resp_u_j / resp_mass_j`` (``resp_u = Σ_i α_ij u_i`` of
    the *mean* loss, so ``T·resp_u`` uses the per-position gradients ``ũ``), then
    ``W_V* = argmin_W ||X W - V*||²`` solved by least squares.

    Args:
        pinv: optional precomputed ``(XᵀX)⁻¹Xᵀ`` ``[batch, d_in, pos]``.
    """
    T = X.shape[1]
    target = torch.bmm(X, W_V) - step * T * resp_u / resp_mass.clamp_min(1e-30)[..., None]
    if pinv is not None:
        return torch.bmm(pinv, target)
    return torch.linalg.lstsq(X, target).solution

