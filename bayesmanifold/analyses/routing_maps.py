"""Per-token routing maps: which context tokens training pushes each head's attention toward.

Paper II (arXiv 2512.22473, §3; PAPERS.md §1) decomposes the gradient of the loss L with respect
to the attention scores s_ij of one head (query i, key j) as

    ∂L/∂s_ij = α_ij (b_ij − b̄_i),   b_ij = u_i·v_j = ∂L/∂α_ij,   b̄_i = Σ_j α_ij b_ij,

with u_i = ∂L/∂z_i the upstream gradient at the head's output. The **advantage** of key j for
query i is A_ij = b̄_i − b_ij, and the **routing force** −∂L/∂s_ij = α_ij A_ij is what one step of
gradient descent adds to s_ij (per unit learning rate): positive force raises the score, so the
attention of query i moves toward key j. Per key token the **net push** is Σ_i α_ij A_ij (it sums
to 0 over the keys of a head, since every query's row of forces does), and the **value-update
size** is ‖Σ_i α_ij u_i‖ = ‖∂L/∂v_j‖ of this query head (exact per head: the kv head of a GQA group
sums its heads' contributions).

Everything comes from ONE capture pass (forward + backward): α from the pattern, b from autograd's
∂L/∂α, u from ∂L/∂z. :func:`routing_map` runs it on a prompt; :class:`RoutingMap`
(:mod:`.routing_map_result`) holds per-head summaries for every measured head (total |force|,
attention mass on keys with A > 0, mean attention entropy, induction and previous-token scores)
and the matrices of the heads it keeps (all, or the ``top`` K by a summary, in float32), and
writes them (``to_dict``, ``save_npz``, ``plot``, ``to_html`` via :mod:`bayesmanifold.maps`).
The accumulator drops a head's matrices as soon as it falls out of the top K, so a map of every
head of a real model holds each head's N² matrices once, in float32, and nothing else of size N².
"""

from collections.abc import Callable, Iterable, Sequence
from dataclasses import replace
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..backends import ModelLike, model_access
from ..errors import InputError, SelectionError
from ..hooks import capture
from ..hooks.bundle import LayerBundle
from ..hooks.objectives import loss_at_positions, next_token_loss
from .routing_map_result import RANKABLE, SUMMARIES, RoutingMap, load_npz_matrices, rank_value
from .stats import entropy

__all__ = [
    "RoutingMap",
    "RoutingMapAccumulator",
    "routing_map",
    "prompt_tokens",
    "token_strings",
    "parse_heads",
    "resolve_objective",
    "OBJECTIVES",
    "RANKABLE",
    "SUMMARIES",
    "PRECISIONS",
    "check_map_options",
    "map_footprint",
    "MAX_MATRIX_BYTES",
    "load_npz_matrices",
]

#: objectives by name: the mean next-token loss over the prompt (default), the loss of the last
#: prediction only, or of chosen prediction positions ("pos:3,7").
OBJECTIVES = ("next-token", "last", "pos:P[,P...]")


# ------------------------------------------------------------------------------------ inputs
def prompt_tokens(model: ModelLike, prompt: str | Sequence[int] | Tensor) -> Tensor:
    """Token ids ``[1, pos]`` of a prompt: the model's tokenizer, else UTF-8 bytes when the
    vocabulary covers the 256 byte values (as ``bayesmanifold scan`` reads text); ids as given.

    Raises:
        InputError: an empty prompt, one longer than the model's context, or text for a model
            that can read neither.
    """
    access = model_access(model)
    if isinstance(prompt, str):
        if not prompt:
            raise InputError("the prompt is empty; give at least two tokens of text")
        ids = access.encode(prompt)
    else:
        ids = torch.as_tensor(prompt)
        if ids.dim() == 2 and ids.shape[0] == 1:
            ids = ids[0]
        if ids.dim() != 1 or ids.is_floating_point() or ids.numel() == 0:
            raise InputError(f"the prompt must be text or a non-empty 1-D sequence of token ids, got shape {tuple(ids.shape)}")
    n_ctx = access.n_ctx
    if n_ctx is not None and len(ids) > n_ctx:
        raise InputError(f"the prompt has {len(ids)} tokens but the model's context is n_ctx={n_ctx}; shorten it")
    return access.as_tokens(ids[None])


def token_strings(model: ModelLike, token_ids: Sequence[int]) -> list[str]:
    """Display strings of tokens: the tokenizer's decoding of each, else the byte (printable
    ASCII as itself, other bytes as ``\\xNN``; newline and tab as ``\\n`` and ``\\t``)."""
    tok = model_access(model).tokenizer
    if tok is not None:
        return [tok.decode([int(i)]) for i in token_ids]
    out = []
    for i in token_ids:
        i = int(i)
        out.append({10: "\\n", 9: "\\t", 13: "\\r"}.get(i) or (chr(i) if 32 <= i < 127 else f"\\x{i:02x}"))
    return out


def parse_heads(heads: Any, model: ModelLike) -> dict[int, list[int]]:
    """``{layer: [heads]}`` from None (all), ``"L.H,L.H"`` or an iterable of ``"L.H"`` / ``(L, H)``
    (a ``"L.*"`` entry is every head of layer L), validated against the model."""
    access = model_access(model)
    if heads is None:
        return {layer: access.norm_heads(None, layer=layer) for layer in access.norm_layers(None)}
    items: Iterable[Any] = heads.split(",") if isinstance(heads, str) else heads
    picked: dict[int, list[int] | None] = {}
    for item in items:
        try:
            if isinstance(item, str):
                lt, ht = item.strip().split(".")
                layer, head = int(lt), (None if ht == "*" else int(ht))
            else:
                layer, head = (int(x) for x in item)
        except (ValueError, TypeError):
            raise SelectionError(f"head {item!r} not understood; use LAYER.HEAD, e.g. 0.1,1.3 (or 1.* for a whole layer)") from None
        (layer,) = access.norm_layers(layer)
        if head is None:
            picked[layer] = None
        elif picked.get(layer, []) is not None:
            picked.setdefault(layer, []).append(head)  # type: ignore[union-attr]
    if not picked:
        raise SelectionError("empty head selection; give LAYER.HEAD pairs, e.g. 0.1,1.3")
    return {layer: access.norm_heads(h, layer=layer) for layer, h in sorted(picked.items())}


def resolve_objective(objective: Any, n_tokens: int) -> tuple[Callable[[Tensor, Any], Tensor], str]:
    """The objective function and its name (see :data:`OBJECTIVES`; a callable is used as is)."""
    if n_tokens < 2 and not callable(objective):
        raise InputError(f"the prompt has {n_tokens} token; a next-token objective needs at least 2")
    if objective is None or objective == "next-token":
        return next_token_loss(), "next-token"
    if callable(objective):
        return objective, getattr(objective, "__name__", "custom")
    if objective == "last":
        return loss_at_positions(n_tokens - 2), "last"
    if isinstance(objective, str) and objective.startswith("pos:"):
        try:
            pos = [int(p) for p in objective[4:].split(",")]
        except ValueError:
            pos = []
        bad = [p for p in pos if not 0 <= p < n_tokens - 1]
        if pos and not bad:
            return loss_at_positions(pos), objective
        raise InputError(f"objective {objective!r}: positions must be integers in 0..{n_tokens - 2} (position p predicts token p+1)")
    raise InputError(f"unknown objective {objective!r}; accepted: {', '.join(OBJECTIVES)} or a function (logits, tokens) -> scalar")


# ------------------------------------------------------------------------------------ accumulator
#: dtypes a map may keep its matrices in (float64 for exact comparisons; float32 by default)
PRECISIONS = ("float32", "float64")


#: the kept matrices (α, A and the force of each kept head) may take at most this much memory;
#: a larger map is refused before the pass, naming the ``top`` that fits
MAX_MATRIX_BYTES = 4 * 2**30
#: bytes of the page per (head, query, key) entry, measured (SmolLM2-135M, 256 tokens, all 270
#: heads: 21.8 MB); sharp heads compress better, diffuse ones worse
PAGE_BYTES_PER_ENTRY = 1.25


def map_footprint(n_tokens: int, n_heads: int, top: int | None = None, precision: str = "float32") -> dict[str, int]:
    """What a map of ``n_heads`` heads on ``n_tokens`` tokens keeps: ``kept`` heads with matrices,
    ``matrix_bytes`` (α, A, force in ``precision``), an estimate of the page's size ``page_bytes``,
    and ``max_top``, the largest ``top`` within :data:`MAX_MATRIX_BYTES`."""
    kept = min(top or n_heads, n_heads)
    per_head = 3 * n_tokens * n_tokens * np.dtype(precision).itemsize
    return {"kept": kept, "matrix_bytes": kept * per_head, "page_bytes": int(kept * n_tokens**2 * PAGE_BYTES_PER_ENTRY),
            "max_top": int(MAX_MATRIX_BYTES // per_head)}


def check_map_options(top: Any = None, by: str = "total_abs_force", precision: str = "float32") -> None:
    """Raise InputError for a bad ``top`` (a positive integer or None), ``by`` or ``precision``."""
    if top is not None and (isinstance(top, bool) or not isinstance(top, (int, np.integer)) or top < 1):
        raise InputError(f"top must be a positive integer (the number of heads whose matrices are kept), got {top!r}")
    if by not in RANKABLE:
        raise InputError(f"unknown summary {by!r} to rank heads by; accepted: {', '.join(RANKABLE)}")
    if precision not in PRECISIONS:
        raise InputError(f"precision {precision!r}; accepted: {', '.join(PRECISIONS)}")


class RoutingMapAccumulator:
    """Capture accumulator over one prompt (batch of 1): per measured head the summaries (all in
    float64, including the routing-law residual max|α A + ∂L/∂s|, 0 up to rounding since the map is
    autograd's own gradient) and, for the ``top`` heads by ``by`` (all when None), the matrices α,
    A, force in ``precision`` with b̄, push and value-update size. Heads that fall out of the top
    are dropped as layers arrive, so memory holds at most ``top`` heads' matrices plus one layer."""

    needs_gradients = True

    def __init__(self, *, top: int | None = None, by: str = "total_abs_force", precision: str = "float32") -> None:
        check_map_options(top, by, precision)
        self.top, self.by, self.dtype = top, by, np.dtype(precision)
        self.rows: dict[tuple[int, int], dict[str, Any]] = {}
        self.mats: dict[tuple[int, int], dict[str, np.ndarray]] = {}
        self.token_ids: list[int] | None = None
        self.query_valid: np.ndarray | None = None
        self.n_heads = 0

    def update(self, b: LayerBundle) -> None:
        if b.pattern.shape[0] != 1:
            raise InputError(f"a routing map is per prompt: got a batch of {b.pattern.shape[0]} sequences")
        if b.grad_pattern is None or b.grad_z is None or b.grad_scores is None:
            raise InputError("a routing map needs the backward pass (capture with gradients)")
        if b.batch is not None and self.token_ids is None:
            self.token_ids = [int(t) for t in b.batch.tokens[0].tolist()]
        valid = b.valid[0].cpu()
        qv = b.query_valid[0].cpu()
        a = b.pattern[0].detach().cpu().double()  # [head, query, key]
        gp = b.grad_pattern[0].detach().cpu().double().masked_fill(~valid, 0.0)
        bbar = (a * gp).sum(-1)
        adv = (bbar[..., None] - gp).masked_fill(~valid, 0.0)
        del gp
        force = a * adv
        gs = b.grad_scores[0].detach().cpu().double().masked_fill(~valid, 0.0)
        scale = gs.abs().amax(dim=(-2, -1)).clamp_min(1e-300)
        resid = ((force + gs).abs().amax(dim=(-2, -1)) / scale).numpy()
        del gs
        u = b.grad_z[0].detach().cpu().double()  # [query, head, d_head]
        vu = torch.einsum("hqk,qhd->hkd", a, u).norm(dim=-1).numpy()
        push = force.sum(-2).numpy()
        aq = a[:, qv]
        pos_mass = torch.where(adv[:, qv] > 0, aq, 0.0).sum(-1).mean(-1).numpy()
        ent = entropy(aq).mean(-1).numpy()
        n = a.shape[-1]
        prev = torch.diagonal(a, offset=-1, dim1=-2, dim2=-1)[:, qv[1:]].mean(-1).numpy() if n > 1 else np.full(len(b.heads), np.nan)
        ind = self._induction(a, qv)
        total = force.abs().sum((-2, -1)).numpy()
        nan = float("nan")
        self.query_valid = qv.numpy()
        self.n_heads = max(self.n_heads, b.n_heads or len(b.heads))
        for k, h in enumerate(b.heads):
            top = int(np.argmax(np.abs(push[k])))
            self.rows[(b.layer, h)] = {
                "layer": b.layer, "head": h, "total_abs_force": float(total[k]), "mass_positive": float(pos_mass[k]),
                "entropy": float(ent[k]), "max_abs_push": float(abs(push[k][top])), "top_push_key": top,
                "max_value_update": float(vu[k].max()), "induction": float(ind[k]) if ind is not None else nan,
                "previous_token": float(prev[k]), "law_residual": float(resid[k]),
            }
            self.mats[(b.layer, h)] = {
                "pattern": a[k].numpy().astype(self.dtype),
                "advantage": torch.where(valid, adv[k], nan).numpy().astype(self.dtype),
                "force": torch.where(valid, force[k], nan).numpy().astype(self.dtype),
                "compat_mean": bbar[k].numpy().copy(), "push": push[k].copy(), "value_update": vu[k].copy(),
            }
        self._prune()

    def _induction(self, a: Tensor, qv: Tensor) -> np.ndarray | None:
        """Mean α from each query whose last two tokens occurred earlier to the key after that
        occurrence (:func:`~bayesmanifold.analyses.induction.induction_targets`); None without targets."""
        from .induction import induction_targets

        if self.token_ids is None:
            return None
        tgt = induction_targets(torch.tensor(self.token_ids), min_match=2)[0]
        q = torch.nonzero((tgt >= 0) & qv).flatten()
        if len(q) == 0:
            return None
        return a[:, q, tgt[q]].mean(-1).numpy()

    def ranked(self) -> list[tuple[int, int]]:
        """Measured heads, largest ``by`` first (NaN last; ties by layer, head)."""
        return sorted(self.rows, key=lambda h: (-rank_value(self.rows[h], self.by), h))

    def _prune(self) -> None:
        if self.top is not None and len(self.mats) > self.top:
            keep = [h for h in self.ranked() if h in self.mats][: self.top]
            for h in set(self.mats) - set(keep):
                del self.mats[h]

    def merge(self, other: "RoutingMapAccumulator") -> "RoutingMapAccumulator":
        """Join the layers of another pass over the same prompt (heads must not overlap)."""
        overlap = set(self.rows) & set(other.rows)
        if overlap:
            raise InputError(f"cannot merge routing maps that both hold heads {', '.join(f'{a}.{b}' for a, b in sorted(overlap))}")
        if self.token_ids is not None and other.token_ids is not None and self.token_ids != other.token_ids:
            raise InputError("cannot merge routing maps of different prompts")
        self.rows.update(other.rows)
        self.mats.update(other.mats)
        self.token_ids = self.token_ids or other.token_ids
        self.query_valid = self.query_valid if self.query_valid is not None else other.query_valid
        self.n_heads = max(self.n_heads, other.n_heads)
        self._prune()
        return self

    def finalize(self) -> RoutingMap:
        if not self.rows:
            raise InputError("the routing map saw no layer: run a capture pass first")
        heads = sorted(self.mats)
        n = len(self.query_valid) if self.query_valid is not None else 0

        def stack(name: str, shape: tuple[int, ...], dtype: Any) -> np.ndarray:
            if not heads:
                return np.zeros((0, *shape), dtype=dtype)
            return np.stack([self.mats[h][name] for h in heads])

        rows = [{**self.rows[h], "kept": h in self.mats} for h in sorted(self.rows)]
        ids = self.token_ids or list(range(n))
        return RoutingMap(
            prompt=None, token_ids=ids, tokens=[str(i) for i in ids], heads=heads,
            pattern=stack("pattern", (n, n), self.dtype), advantage=stack("advantage", (n, n), self.dtype),
            force=stack("force", (n, n), self.dtype), compat_mean=stack("compat_mean", (n,), np.float64),
            push=stack("push", (n,), np.float64), value_update=stack("value_update", (n,), np.float64),
            law_residual=np.array([self.rows[h]["law_residual"] for h in heads]),
            query_valid=self.query_valid, summaries=rows, loss=float("nan"), objective="next-token",
            n_layers=max(h[0] for h in self.rows) + 1, n_heads=self.n_heads, by=self.by)


# ------------------------------------------------------------------------------------ entry point
def routing_map(
    model: ModelLike,
    prompt: str | Sequence[int] | Tensor,
    *,
    heads: Any = None,
    objective: Any = None,
    top: int | None = None,
    by: str = "total_abs_force",
    precision: str = "float32",
) -> RoutingMap:
    """The per-token routing map of ``prompt`` for every selected head, from one capture pass.

    Args:
        model: a TransformerLens model (or its backend).
        prompt: text (the model's tokenizer, or UTF-8 bytes for a byte-vocabulary model) or ids.
        heads: None (all), ``"L.H,..."`` or ``[(L, H), ...]``.
        objective: ``"next-token"`` (default: mean next-token cross-entropy over the prompt),
            ``"last"``, ``"pos:P,..."`` or a function ``(logits, tokens) -> scalar``.
        top: keep the matrices of only the K heads with the largest ``by`` (every selected head
            keeps its summaries); None keeps all.
        by: the summary that ranks heads for ``top`` (see :data:`RANKABLE`).
        precision: the dtype of the kept matrices, ``"float32"`` (default) or ``"float64"``.

    Raises:
        InputError / SelectionError: before any pass, for an empty or too long prompt, heads out
            of range, an unknown objective, a bad ``top``, ``by`` or ``precision``, or kept
            matrices that would exceed :data:`MAX_MATRIX_BYTES` (the message names the ``top`` that fits).

    Example:
        >>> m = routing_map(model, "def f(x): return f(x)", heads="1.0,1.1")  # doctest: +SKIP
        >>> m.summary_frame()  # doctest: +SKIP
    """
    check_map_options(top, by, precision)
    sel = parse_heads(heads, model)
    tokens = prompt_tokens(model, prompt)
    fn, name = resolve_objective(objective, int(tokens.shape[1]))
    fp = map_footprint(int(tokens.shape[1]), sum(len(h) for h in sel.values()), top, precision)
    if fp["matrix_bytes"] > MAX_MATRIX_BYTES:
        raise InputError(f"{fp['kept']} heads' matrices on {tokens.shape[1]} tokens would take {fp['matrix_bytes'] / 2**30:.1f} GiB "
                         f"(limit {MAX_MATRIX_BYTES / 2**30:.0f} GiB); keep fewer with top=K (--top K), K <= {fp['max_top']}, "
                         "or shorten the prompt")
    acc = RoutingMapAccumulator(top=top, by=by, precision=precision)
    with capture(model, accumulators=[acc], layers=list(sel), heads=sel, objective=fn) as cap:
        loss = cap.run(tokens)
    res = acc.finalize()
    ids = [int(t) for t in tokens[0].tolist()]
    return replace(res, prompt=prompt if isinstance(prompt, str) else None, token_ids=ids,
                   tokens=token_strings(model, ids), loss=float(loss), objective=name,
                   n_layers=model_access(model).n_layers)
