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
∂L/∂α, u from ∂L/∂z. :func:`routing_map` runs it on a prompt; :class:`RoutingMap` holds the
matrices per head with per-head summaries (total |force|, attention mass on keys with A > 0, mean
attention entropy) and renders them (``plot``, ``to_html`` via :mod:`bayesmanifold.maps`).
"""

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..backends import ModelLike, model_access
from ..errors import InputError, SelectionError
from ..hooks import capture
from ..hooks.bundle import LayerBundle
from ..hooks.objectives import loss_at_positions, next_token_loss
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
class RoutingMapAccumulator:
    """Capture accumulator: per selected head of one prompt (batch of 1), the float64 matrices
    α, b, A, force, the row means b̄, the per-key push and value-update size, and the routing-law
    residual max|α A + ∂L/∂s| (0 up to rounding: the map is autograd's own gradient)."""

    needs_gradients = True

    def __init__(self) -> None:
        self.layers: dict[int, dict[str, Any]] = {}
        self.token_ids: list[int] | None = None

    def update(self, b: LayerBundle) -> None:
        if b.pattern.shape[0] != 1:
            raise InputError(f"a routing map is per prompt: got a batch of {b.pattern.shape[0]} sequences")
        if b.grad_pattern is None or b.grad_z is None or b.grad_scores is None:
            raise InputError("a routing map needs the backward pass (capture with gradients)")
        valid = b.valid[0].cpu()
        a = b.pattern[0].detach().cpu().double()
        gp = b.grad_pattern[0].detach().cpu().double().masked_fill(~valid, 0.0)
        bbar = (a * gp).sum(-1)
        adv = (bbar[..., None] - gp).masked_fill(~valid, 0.0)
        force = a * adv
        gs = b.grad_scores[0].detach().cpu().double().masked_fill(~valid, 0.0)
        u = b.grad_z[0].detach().cpu().double()  # [query, head, d_head]
        vu = torch.einsum("hqk,qhd->hkd", a, u).norm(dim=-1)
        scale = gs.abs().amax(dim=(-2, -1)).clamp_min(1e-300)
        nan = torch.tensor(float("nan"), dtype=torch.float64)
        self.layers[b.layer] = {
            "heads": list(b.heads),
            "pattern": a.numpy(),
            "compat": torch.where(valid, gp, nan).numpy(),
            "compat_mean": bbar.numpy(),
            "advantage": torch.where(valid, adv, nan).numpy(),
            "force": torch.where(valid, force, nan).numpy(),
            "push": force.sum(-2).numpy(),
            "value_update": vu.numpy(),
            "law_residual": ((force + gs).abs().amax(dim=(-2, -1)) / scale).numpy(),
            "query_valid": b.query_valid[0].cpu().numpy(),
        }
        if b.batch is not None and self.token_ids is None:
            self.token_ids = [int(t) for t in b.batch.tokens[0].tolist()]

    def merge(self, other: "RoutingMapAccumulator") -> "RoutingMapAccumulator":
        """Join the layers of another pass over the same prompt (layers must not overlap)."""
        overlap = set(self.layers) & set(other.layers)
        if overlap:
            raise InputError(f"cannot merge routing maps that both hold layers {sorted(overlap)}")
        if self.token_ids is not None and other.token_ids is not None and self.token_ids != other.token_ids:
            raise InputError("cannot merge routing maps of different prompts")
        self.layers.update(other.layers)
        self.token_ids = self.token_ids or other.token_ids
        return self

    def finalize(self) -> "RoutingMap":
        if not self.layers:
            raise InputError("the routing map saw no layer: run a capture pass first")
        heads, parts = [], {k: [] for k in _ARRAYS}
        for layer in sorted(self.layers):
            d = self.layers[layer]
            heads += [(layer, h) for h in d["heads"]]
            for k in _ARRAYS:
                parts[k].append(d[k])
        arrays = {k: np.concatenate(v) for k, v in parts.items()}
        qv = next(iter(self.layers.values()))["query_valid"]
        ids = self.token_ids or list(range(arrays["pattern"].shape[-1]))
        return RoutingMap(prompt=None, token_ids=ids, tokens=[str(i) for i in ids], heads=heads,
                          loss=float("nan"), objective="next-token", query_valid=qv, **arrays)


_ARRAYS = ("pattern", "compat", "compat_mean", "advantage", "force", "push", "value_update", "law_residual")


# ------------------------------------------------------------------------------------ result
def _lists(a: np.ndarray) -> Any:
    """Nested lists with NaN (masked entries) as None (JSON null)."""
    return np.where(np.isfinite(a), a, None).tolist() if a.dtype.kind == "f" else a.tolist()


@dataclass(frozen=True, eq=False)
class RoutingMap:
    """The routing map of one prompt: arrays indexed [head, query, key] / [head, key] / [head].

    ``heads[k] = (layer, head)`` names row k. ``pattern`` α (0 on masked entries); ``compat`` b;
    ``compat_mean`` b̄ [head, query]; ``advantage`` A = b̄ − b; ``force`` −∂L/∂s = α A (b, A and
    force are NaN on masked entries); ``push`` Σ_i force_ij per key; ``value_update`` ‖Σ_i α_ij u_i‖
    per key; ``law_residual`` max|force + ∂L/∂s| / max|∂L/∂s| per head (the autograd check).
    """

    prompt: str | None
    token_ids: list[int]
    tokens: list[str]
    heads: list[tuple[int, int]]
    pattern: np.ndarray
    compat: np.ndarray
    compat_mean: np.ndarray
    advantage: np.ndarray
    force: np.ndarray
    push: np.ndarray
    value_update: np.ndarray
    law_residual: np.ndarray
    query_valid: np.ndarray
    loss: float
    objective: str

    def index(self, layer: int, head: int) -> int:
        """Row of ``(layer, head)`` in the arrays."""
        try:
            return self.heads.index((int(layer), int(head)))
        except ValueError:
            raise SelectionError(f"head {layer}.{head} is not in this map; it holds {', '.join(f'{a}.{b}' for a, b in self.heads)}") from None

    @property
    def summaries(self) -> list[dict[str, Any]]:
        """Per head: total |force|, attention mass on A > 0 (mean over queries), mean attention
        entropy (nats), the largest |push| and the key that gets it, max value-update size."""
        rows = []
        qv = self.query_valid
        for k, (layer, head) in enumerate(self.heads):
            a, adv, f = self.pattern[k][qv], self.advantage[k][qv], self.force[k]
            top = int(np.argmax(np.abs(self.push[k])))
            rows.append({
                "layer": layer,
                "head": head,
                "total_abs_force": float(np.nansum(np.abs(f))),
                "mass_positive": float(np.where(np.nan_to_num(adv) > 0, a, 0.0).sum(-1).mean()),
                "entropy": float(entropy(torch.from_numpy(a)).mean()),
                "max_abs_push": float(abs(self.push[k][top])),
                "top_push_key": top,
                "max_value_update": float(self.value_update[k].max()),
                "law_residual": float(self.law_residual[k]),
            })
        return rows

    def to_dataframe(self):
        """Tidy: one row per (layer, head, query, key) unmasked entry with α, b, b̄, A, force."""
        import pandas as pd

        frames = []
        for k, (layer, head) in enumerate(self.heads):
            q, j = np.nonzero(np.isfinite(self.force[k]))
            frames.append(pd.DataFrame({
                "layer": layer, "head": head, "query": q, "key": j,
                "alpha": self.pattern[k][q, j], "b": self.compat[k][q, j], "b_mean": self.compat_mean[k][q],
                "advantage": self.advantage[k][q, j], "force": self.force[k][q, j],
            }))
        return pd.concat(frames, ignore_index=True)

    def summary_frame(self):
        """The per-head :attr:`summaries` as a DataFrame."""
        import pandas as pd

        return pd.DataFrame(self.summaries)

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe: prompt, token_ids, tokens, objective, loss and per head ``layer``, ``head``,
        ``pattern``, ``advantage``, ``force``, ``compat``, ``compat_mean`` (nested lists, null on
        masked entries), ``push``, ``value_update`` and the summary numbers."""
        heads = []
        for k, s in enumerate(self.summaries):
            heads.append({**s, **{name: _lists(getattr(self, name)[k]) for name in
                                  ("pattern", "advantage", "force", "compat", "compat_mean", "push", "value_update")}})
        return {"prompt": self.prompt, "token_ids": list(self.token_ids), "tokens": list(self.tokens),
                "objective": self.objective, "loss": self.loss,
                "sign_convention": "force = -dL/ds_ij = alpha_ij * A_ij, A_ij = b_mean_i - b_ij; force > 0: "
                                   "a gradient-descent step raises s_ij (attention moves toward key j)",
                "heads": heads}

    def plot(self, ax=None, *, layer: int | None = None, head: int | None = None, what: str = "force"):
        """One head's ``force`` (default), ``advantage`` or ``pattern`` matrix as a heat map
        (diverging, red = positive); default head: the largest total |force|."""
        import matplotlib.pyplot as plt

        if what not in ("force", "advantage", "pattern"):
            raise InputError(f"what={what!r}; accepted: force, advantage, pattern")
        if layer is None or head is None:
            k = int(np.argmax([s["total_abs_force"] for s in self.summaries]))
        else:
            k = self.index(layer, head)
        if ax is None:
            _, ax = plt.subplots(figsize=(5, 4.4))
        m = getattr(self, what)[k]
        if what == "pattern":
            im = ax.imshow(m, cmap="Greys", vmin=0, vmax=1)
        else:
            lim = float(np.nanmax(np.abs(m))) or 1.0
            im = ax.imshow(np.ma.masked_invalid(m), cmap="RdBu_r", vmin=-lim, vmax=lim)
        ax.set_xlabel("key position j")
        ax.set_ylabel("query position i")
        name = {"force": "routing force −∂L/∂s = αA", "advantage": "advantage A = b̄ − b", "pattern": "attention α"}[what]
        ax.set_title(f"L{self.heads[k][0]}H{self.heads[k][1]}: {name}", fontsize=9)
        ax.figure.colorbar(im, ax=ax)
        return ax

    def to_html(self, *, title: str | None = None) -> str:
        """A self-contained HTML page (inline CSS/JS, no network): head grid, heat map with hover,
        token strip coloured by push. Write it with any file API; ``bayesmanifold map`` does."""
        from ..maps.html import render_map

        return render_map(self.to_dict(), title=title)


# ------------------------------------------------------------------------------------ entry point
def routing_map(
    model: ModelLike,
    prompt: str | Sequence[int] | Tensor,
    *,
    heads: Any = None,
    objective: Any = None,
) -> RoutingMap:
    """The per-token routing map of ``prompt`` for every selected head, from one capture pass.

    Args:
        model: a TransformerLens model.
        prompt: text (the model's tokenizer, or UTF-8 bytes for a byte-vocabulary model) or ids.
        heads: None (all), ``"L.H,..."`` or ``[(L, H), ...]``.
        objective: ``"next-token"`` (default: mean next-token cross-entropy over the prompt),
            ``"last"``, ``"pos:P,..."`` or a function ``(logits, tokens) -> scalar``.

    Raises:
        InputError / SelectionError: before any pass, for an empty or too long prompt, heads out
            of range or an unknown objective.

    Example:
        >>> m = routing_map(model, "def f(x): return f(x)", heads="1.0,1.1")  # doctest: +SKIP
        >>> m.summary_frame()  # doctest: +SKIP
    """
    sel = parse_heads(heads, model)
    tokens = prompt_tokens(model, prompt)
    fn, name = resolve_objective(objective, int(tokens.shape[1]))
    acc = RoutingMapAccumulator()
    with capture(model, accumulators=[acc], layers=list(sel), heads=sel, objective=fn) as cap:
        loss = cap.run(tokens)
    res = acc.finalize()
    ids = [int(t) for t in tokens[0].tolist()]
    return replace(res, prompt=prompt if isinstance(prompt, str) else None, token_ids=ids,
                   tokens=token_strings(model, ids), loss=float(loss), objective=name)
