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

__all__ = ["init_weights", "attention_forward_backward", "m_step_values", "EXP2_BOUND"]

LOG2E = 1.4426950408889634  # log2(e)
EXP2_BOUND = 64.0  # base-2 scores within ±64 are exponentiated without subtracting the row maximum


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

    Per block of queries two ``[queries, keys]`` matrices are formed, the exponentiated scores
    ``e`` (in base 2, so that ``exp2`` replaces the costlier ``exp``) and ``b ⊙ e``, and each is
    read by one product: ``e`` with ``[X, 1]`` (which gives the row sums too), ``b ⊙ e`` with
    ``X``. The softmax is not normalised in place: ``1/Σ_j e_ij`` multiplies the
    ``[queries, d_in]`` results instead. No row maximum is subtracted when
    ``max_i |q_i| · max_j |k_j|`` (a bound on every base-2 score of the batch) is at most
    :data:`EXP2_BOUND`, so that every exponential lies in ``[2^-64, 2^64]``, far from float32's
    overflow and subnormal range; otherwise the row maxima are subtracted first, as a softmax
    does. ``b_ij = u_i·v_j`` is computed as ``g_i · (x_j W_V W_O)`` (``u_i = g_i W_Oᵀ``,
    ``g_i = ∂L/∂logits_i``), an inner size of 8 instead of 15.

    Args:
        responsibility_rows: batch rows for which ``Σ_i α_ij u_i`` and ``Σ_i α_ij`` are also
            returned (needed by the closed-form M-step).
    """
    B, T, d = X.shape
    scale = math.sqrt(W_Q.shape[-1])
    Q = torch.bmm(X, W_Q * (LOG2E / scale))  # base-2 scores: 2^(q'·k) = e^(q·k/√d)
    K = torch.bmm(X, W_K)
    shift = bool((Q.norm(dim=-1).amax(-1) * K.norm(dim=-1).amax(-1) > EXP2_BOUND).any())
    # keys, inputs and p_j = x_j W_V W_O as columns [batch, ·, pos]: the block products read them
    # without a transpose
    Kt = K.transpose(1, 2).contiguous()
    Xt = torch.cat([X, X.new_ones(B, T, 1)], -1).transpose(1, 2).contiguous()  # a row of ones: Σ_j e_ij comes with eX
    W_VO = torch.bmm(W_V, W_O)
    Pt = torch.bmm(X, W_VO).transpose(1, 2).contiguous()
    H = X.new_zeros(B, d, W_O.shape[-1])  # Σ_i (αX)_iᵀ g_i: ∂L/∂W_O = W_Vᵀ H, ∂L/∂W_V = H W_Oᵀ
    C = X.new_zeros(B, d, d)  # Xᵀ G_S X
    logits_all = X.new_empty(B, T, W_O.shape[-1])  # the per-position metrics are reduced once, after the loop
    neg = torch.full((tile, tile), float("-inf"), dtype=X.dtype, device=X.device).triu(1)
    minus_one = torch.full((B, tile, 1), -1.0, dtype=X.dtype, device=X.device)
    rr = responsibility_rows
    resp = None
    if rr is not None and rr.numel():
        resp = X.new_zeros(rr.numel(), T, W_O.shape[-1] + 1)  # [Σ_i α_ij g_i, Σ_i α_ij]
    for a in range(0, T, tile):
        b = min(a + tile, T)
        n = b - a
        E = torch.bmm(Q[:, a:b], Kt[:, :, :b])
        E[:, :, a:b] += neg[:n, :n]
        if shift:
            E.sub_(E.amax(-1, keepdim=True))
        E.exp2_()  # α_ij = e_ij · r_i
        eX = torch.bmm(Xt[:, :, :b], E.transpose(1, 2)).transpose(1, 2)  # [batch, n, d + 1]: Σ_j e_ij x_j, Σ_j e_ij
        r = eX[..., d:].reciprocal()
        AX = eX[..., :d].mul_(r)  # (αX)_i
        logits = torch.bmm(AX, W_VO, out=logits_all[:, a:b])
        G = torch.softmax(logits, -1).scatter_add_(2, y[:, a:b, None], minus_one[:, :n]).div_(T)  # (p − onehot(y)) / T
        H.baddbmm_(AX.transpose(1, 2), G)
        bbar = torch.linalg.vecdot(G, logits).unsqueeze(-1)  # b̄_i = u_i·z_i = g_i·logits_i
        BE = torch.bmm(G, Pt[:, :, :b]).mul_(E)  # b_ij e_ij, b_ij = u_i·v_j = g_i·p_j
        # G_S X = r ⊙ (b ⊙ e) X - b̄ (αX)
        GSX = torch.bmm(Xt[:, :d, :b], BE.transpose(1, 2)).transpose(1, 2).mul_(r).sub_(bbar * AX)
        C.baddbmm_(Xt[:, :d, a:b], GSX)
        if resp is not None:
            Gr = torch.cat([G.index_select(0, rr), X.new_ones(rr.numel(), n, 1)], -1).mul_(r.index_select(0, rr))
            resp[:, :b] += torch.bmm(E.index_select(0, rr).transpose(1, 2), Gr)
    logp_all = torch.log_softmax(logits_all, -1)
    loss = -logp_all.gather(2, y[..., None]).squeeze(-1).sum(1, dtype=torch.float64)
    ent = -(logp_all.exp() * logp_all).sum((1, 2), dtype=torch.float64)
    acc = (logits_all.argmax(-1) == y).sum(1, dtype=torch.float64)
    g_Q = torch.bmm(C, W_K) / scale
    g_K = torch.bmm(C.transpose(1, 2), W_Q) / scale
    g_V = torch.bmm(H, W_O.transpose(1, 2))
    g_O = torch.bmm(W_V.transpose(1, 2), H)
    resp_u = resp_mass = None
    if resp is not None:
        resp_u = torch.bmm(resp[..., :-1], W_O.index_select(0, rr).transpose(1, 2))  # Σ_i α_ij u_i
        resp_mass = resp[..., -1]
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

