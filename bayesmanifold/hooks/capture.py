"""Capture, per attention layer and head, what the gradient laws of Paper II need.

For one forward+backward pass this module delivers, per layer, the attention pattern α, the
values v, the upstream gradient u = ∂L/∂z and the gradients autograd already computes on the way:
∂L/∂α (= b, the compatibilities u_i·v_j), ∂L/∂s and ∂L/∂v (arXiv 2512.22473, §3; PAPERS.md §1).

How it stays cheap and side-effect free:

- Nothing is recomputed: forward hooks keep detached references to α and v (tensors autograd saves
  anyway) and register tensor hooks that receive the gradients as the backward pass makes them.
- Streaming: the moment a layer's four gradients have arrived, its :class:`LayerBundle` is handed
  to every accumulator and dropped, so at most about one layer's gradients are held at a time.
- Gradients are taken with ``torch.autograd.grad`` with respect to a detached copy of the
  embedding output (or of a float input), never the parameters: ``.grad`` and ``requires_grad``
  of the user's model are left as found, frozen models work, and the weight-gradient matmuls are
  skipped.
- Only our own hooks are registered (plain PyTorch handles on the hook points) and they are
  removed in ``__exit__``, also when the objective raises; the user's hooks stay.
"""

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

import torch
from jaxtyping import Bool, Float
from torch import Tensor, nn

from ..errors import InputError, ModelError, ObjectiveError, SelectionError
from .objectives import Objective, next_token_loss, validate_objective_value
from .points import find_attention_layers, select_heads, select_layers

__all__ = ["LayerBundle", "Accumulator", "Capture", "capture"]


@dataclass(eq=False)
class LayerBundle:
    """Everything one attention layer contributes to the gradient laws, for one batch.

    Dimension ``head`` indexes the selected query heads (``heads``). Entries of ``grad_pattern``
    outside ``valid`` are not meaningful (autograd's ∂L/∂α is u·v there, though α is 0).
    """

    layer: int
    heads: list[int]
    kv_heads: list[int]
    attn_scale: float | None
    pattern: Float[Tensor, "batch head query_pos key_pos"]
    values: Float[Tensor, "batch key_pos head d_head"]
    grad_z: Float[Tensor, "batch query_pos head d_head"]
    grad_pattern: Float[Tensor, "batch head query_pos key_pos"]
    grad_scores: Float[Tensor, "batch head query_pos key_pos"]
    grad_values: Float[Tensor, "batch key_pos kv_head d_head"]
    valid: Bool[Tensor, "batch query_pos key_pos"]
    query_valid: Bool[Tensor, "batch query_pos"]
    n_heads: int = 0
    n_kv_heads: int = 0

    @property
    def group_complete(self) -> list[bool]:
        """Per kv head of ``grad_values``: whether every query head of its group is selected.

        The autograd value gradient of a shared kv head sums over its whole group, so the value
        law can only be checked on kv heads whose group is complete.
        """
        group = self.n_heads // self.n_kv_heads
        selected = set(self.heads)
        return [all(g * group + i in selected for i in range(group)) for g in range(self.n_kv_heads)]


class Accumulator(Protocol):
    """What capture hands each layer's bundle to (mergeable streaming statistics)."""

    def update(self, bundle: LayerBundle) -> None: ...

    def merge(self, other: Any) -> Any: ...

    def finalize(self) -> Any: ...


_GRAD_NAMES = ("grad_scores", "grad_pattern", "grad_values", "grad_z")


@dataclass
class _LayerState:
    pattern: Tensor | None = None
    values: Tensor | None = None
    valid: Tensor | None = None
    grads: dict[str, Tensor] = field(default_factory=dict)


def _model_device(model: nn.Module) -> torch.device:
    cfg = getattr(model, "cfg", None)
    if cfg is not None and getattr(cfg, "device", None) is not None:
        return torch.device(cfg.device)
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


class Capture:
    """Attach capture hooks to ``model`` for the duration of a ``with`` block (alias: ``capture``).

    Args:
        model: a ``HookedTransformer`` or any ``HookedRootModule`` with TransformerLens hook names.
        accumulators: objects with ``update(bundle)``, ``merge(other)``, ``finalize()``; each
            receives every selected layer's :class:`LayerBundle` as soon as backward produces it.
        layers: layer index, indices, or None for all.
        heads: head indices for every layer, a ``{layer: heads}`` mapping, or None for all.
        keep: also keep each layer's bundle of the last run in ``cap.kept`` (opt-in: memory).
        keep_query_positions: keep only these query positions (slice or indices).
        keep_device: move kept tensors there (e.g. ``"cpu"`` to offload from a GPU).
        objective: default ``fn(logits, inputs) -> scalar`` for :meth:`Capture.run`.
        input_hook: the hook point whose output becomes the gradient leaf (token models).

    Example:
        >>> from bayesmanifold.analyses.routing import RoutingLawCheck
        >>> check = RoutingLawCheck()
        >>> with capture(model, accumulators=[check]) as cap:  # doctest: +SKIP
        ...     cap.run(tokens)
        >>> check.finalize().to_dataframe()  # doctest: +SKIP
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        accumulators: Iterable[Accumulator] = (),
        layers: int | Iterable[int] | None = None,
        heads: int | Sequence[int] | Mapping[int, Sequence[int]] | None = None,
        keep: bool = False,
        keep_query_positions: slice | Sequence[int] | None = None,
        keep_device: str | torch.device | None = None,
        objective: Objective | None = None,
        input_hook: str | None = "hook_embed",
    ) -> None:
        self.model = model
        self._infos = find_attention_layers(model)
        self.layers = select_layers(self._infos, layers)
        self._heads_arg = heads
        if isinstance(heads, Mapping):
            unknown = set(heads) - set(self.layers)
            if unknown:
                raise SelectionError(
                    f"heads given for layers {sorted(unknown)} that are not selected; selected layers: {self.layers}"
                )
        for layer in self.layers:  # validate head selections up front where the config says n_heads
            n = self._infos[layer].n_heads
            if n is not None:
                self._heads_for(layer, n)
        self.accumulators = list(accumulators)
        for acc in self.accumulators:
            if not callable(getattr(acc, "update", None)):
                raise InputError(f"accumulator {type(acc).__name__} has no update(bundle) method")
        self.keep = keep
        self.keep_query_positions = keep_query_positions
        self.keep_device = torch.device(keep_device) if keep_device is not None else None
        self.objective = objective
        self.input_hook = input_hook if input_hook in model.hook_dict else None
        self.kept: dict[int, LayerBundle] = {}
        self.last_loss: float | None = None
        self._handles: list[Any] = []
        self._active = False
        self._state: dict[int, _LayerState] = {}
        self._leaf: Tensor | None = None
        self._query_mask: Tensor | None = None
        self._n_grads = 0

    # ------------------------------------------------------------------ lifetime
    def __enter__(self) -> "Capture":
        try:
            self._register()
        except BaseException:
            self._remove()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self._remove()

    def _register(self) -> None:
        hd = self.model.hook_dict
        if self.input_hook is not None:
            self._handles.append(hd[self.input_hook].register_forward_hook(self._input_fwd))
        for layer in self.layers:
            prefix = f"blocks.{layer}.attn."
            for name, fn in (
                ("hook_attn_scores", self._scores_fwd),
                ("hook_pattern", self._pattern_fwd),
                ("hook_v", self._v_fwd),
                ("hook_z", self._z_fwd),
            ):
                self._handles.append(hd[prefix + name].register_forward_hook(_bind(fn, layer)))

    def _remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._state.clear()
        self._leaf = None
        self._active = False

    # ------------------------------------------------------------------ forward hooks
    def _input_fwd(self, module: nn.Module, inputs: Any, output: Tensor) -> Tensor | None:
        if not self._active:
            return None
        leaf = output.detach().requires_grad_(True)
        self._leaf = leaf
        return leaf

    def _watch(self, layer: int, name: str, tensor: Tensor) -> None:
        if tensor.requires_grad:
            tensor.register_hook(_bind(self._grad_arrived, layer, name))

    def _scores_fwd(self, layer: int, module: nn.Module, inputs: Any, output: Tensor) -> None:
        if not self._active:
            return
        st = self._state.setdefault(layer, _LayerState())
        # The mask is the same for every head; head 0's scores say which entries were masked.
        st.valid = torch.isfinite(output[:, 0].detach())
        self._watch(layer, "grad_scores", output)

    def _pattern_fwd(self, layer: int, module: nn.Module, inputs: Any, output: Tensor) -> None:
        if not self._active:
            return
        self._state.setdefault(layer, _LayerState()).pattern = output.detach()
        self._watch(layer, "grad_pattern", output)

    def _v_fwd(self, layer: int, module: nn.Module, inputs: Any, output: Tensor) -> None:
        if not self._active:
            return
        self._state.setdefault(layer, _LayerState()).values = output.detach()
        self._watch(layer, "grad_values", output)

    def _z_fwd(self, layer: int, module: nn.Module, inputs: Any, output: Tensor) -> None:
        if not self._active:
            return
        self._watch(layer, "grad_z", output)

    # ------------------------------------------------------------------ backward
    def _grad_arrived(self, layer: int, name: str, grad: Tensor) -> None:
        st = self._state.get(layer)
        if st is None:
            return
        st.grads[name] = grad.detach()
        self._n_grads += 1
        if len(st.grads) == len(_GRAD_NAMES):
            self._dispatch(layer)

    def _heads_for(self, layer: int, n_heads: int) -> list[int]:
        h = self._heads_arg
        if isinstance(h, Mapping):
            h = h.get(layer)
        return select_heads(n_heads, h, layer=layer)

    def _dispatch(self, layer: int) -> None:
        st = self._state.pop(layer)
        if st.pattern is None or st.values is None or st.valid is None:
            return
        pattern, values = st.pattern, st.values
        n_heads, n_kv = pattern.shape[1], values.shape[2]
        if n_heads % n_kv:
            raise ModelError(f"layer {layer}: {n_heads} query heads are not a multiple of {n_kv} kv heads")
        zeros = {
            "grad_scores": lambda: torch.zeros_like(pattern),
            "grad_pattern": lambda: torch.zeros_like(pattern),
            "grad_values": lambda: torch.zeros_like(values),
            "grad_z": lambda: pattern.new_zeros(pattern.shape[0], pattern.shape[2], n_heads, values.shape[-1]),
        }
        g = {k: st.grads[k] if k in st.grads else zeros[k]() for k in _GRAD_NAMES}
        heads = self._heads_for(layer, n_heads)
        group = n_heads // n_kv
        kv_heads = [h // group for h in heads]
        valid = st.valid
        query_valid = valid.any(dim=-1)
        if self._query_mask is not None:
            query_valid = query_valid & self._query_mask
        grad_scores = g["grad_scores"]
        if not bool(query_valid.all()):
            # Fully masked query rows (left padding) give NaN in ∂L/∂s: they carry no attention.
            grad_scores = grad_scores.masked_fill(~query_valid[:, None, :, None], 0.0)
        all_heads = len(heads) == n_heads
        idx = torch.tensor(heads, device=pattern.device)
        kv_idx = torch.tensor(kv_heads, device=pattern.device)
        bundle = LayerBundle(
            layer=layer,
            heads=heads,
            kv_heads=kv_heads,
            attn_scale=self._infos[layer].attn_scale,
            pattern=pattern if all_heads else pattern.index_select(1, idx),
            values=values if group == 1 and all_heads else values.index_select(2, kv_idx),
            grad_z=g["grad_z"] if all_heads else g["grad_z"].index_select(2, idx),
            grad_pattern=g["grad_pattern"] if all_heads else g["grad_pattern"].index_select(1, idx),
            grad_scores=grad_scores if all_heads else grad_scores.index_select(1, idx),
            grad_values=g["grad_values"],
            valid=valid,
            query_valid=query_valid,
            n_heads=n_heads,
            n_kv_heads=n_kv,
        )
        for acc in self.accumulators:
            acc.update(bundle)
        if self.keep:
            self.kept[layer] = self._to_kept(bundle)

    def _to_kept(self, b: LayerBundle) -> LayerBundle:
        qp = self.keep_query_positions
        dev = self.keep_device

        def q(t: Tensor, dim: int) -> Tensor:
            if isinstance(qp, slice):
                t = t[(slice(None),) * dim + (qp,)].clone()
            elif qp is not None:
                t = t.index_select(dim, torch.as_tensor(list(qp), dtype=torch.long, device=t.device))
            return t.to(dev) if dev is not None else t

        return replace(
            b,
            pattern=q(b.pattern, 2),
            grad_pattern=q(b.grad_pattern, 2),
            grad_scores=q(b.grad_scores, 2),
            grad_z=q(b.grad_z, 1),
            valid=q(b.valid, 1),
            query_valid=q(b.query_valid, 1),
            values=b.values.to(dev) if dev is not None else b.values,
            grad_values=b.grad_values.to(dev) if dev is not None else b.grad_values,
        )

    # ------------------------------------------------------------------ the pass
    def run(
        self,
        inputs: Any,
        *,
        attention_mask: Tensor | None = None,
        objective: Objective | None = None,
        **forward_kwargs: Any,
    ) -> float:
        """Run one forward+backward pass and stream every selected layer to the accumulators.

        Args:
            inputs: token ids ``Int[Tensor, "batch pos"]`` (or ``"pos"``), a string or list of
                strings (tokenised with the model's tokenizer), or a float tensor for models whose
                input is not tokens.
            attention_mask: ``Int[Tensor, "batch pos"]``, 1 for real tokens (left or right padding).
            objective: ``fn(logits, inputs) -> scalar``; default next-token cross-entropy.
            **forward_kwargs: passed to the model's forward.

        Returns:
            The objective's value.
        """
        if not self._handles:
            raise InputError("capture hooks are not attached: use `with capture(model, ...) as cap:`")
        self.kept = {}
        model = self.model
        inputs, attention_mask = self._check_inputs(inputs, attention_mask)
        objective = objective or self.objective
        float_input = torch.is_floating_point(inputs)
        if objective is None:
            if float_input:
                raise ObjectiveError(
                    "the default objective (next-token loss) needs token inputs; pass objective=fn(logits, inputs)"
                )
            objective = next_token_loss(attention_mask)
        self._query_mask = attention_mask.bool() if attention_mask is not None else None
        if float_input or self.input_hook is None:
            if not float_input:
                raise ModelError(
                    f"{type(model).__name__} has no hook_embed to start the gradient path from; "
                    "pass float inputs or a model with a hook_embed hook point"
                )
            leaf = inputs.detach().clone().requires_grad_(True)
            self._leaf = leaf
            call_inputs = leaf
        else:
            call_inputs = inputs
        if attention_mask is not None:
            forward_kwargs["attention_mask"] = attention_mask
        self._n_grads = 0
        self._active = True
        try:
            with torch.enable_grad():
                logits = model(call_inputs, **forward_kwargs)
                self._active = False
                leaf = self._leaf
                if leaf is None:
                    raise ModelError("the input hook never fired: capture could not start a gradient path")
                value = objective(logits, inputs)
                validate_objective_value(value)
                if not self._state:
                    raise ObjectiveError("no selected attention layer ran in the forward pass")
                (grad_leaf,) = torch.autograd.grad(value, [leaf], allow_unused=True)
            if self._n_grads == 0:
                raise ObjectiveError(
                    "the objective has no gradient path to the selected attention layers "
                    "(does it depend on the logits?)"
                )
            # Layers the objective does not depend on get zero gradients (there is no flow).
            for layer in sorted(self._state, reverse=True):
                self._dispatch(layer)
            self.last_loss = float(value.detach())
            return self.last_loss
        finally:
            self._active = False
            self._state.clear()
            self._leaf = None
            self._query_mask = None

    def _check_inputs(self, inputs: Any, attention_mask: Tensor | None) -> tuple[Tensor, Tensor | None]:
        model = self.model
        cfg = getattr(model, "cfg", None)
        device = _model_device(model)
        if isinstance(inputs, str) or (isinstance(inputs, list) and inputs and isinstance(inputs[0], str)):
            if getattr(model, "tokenizer", None) is None:
                raise InputError("text input needs a model with a tokenizer; pass token ids instead")
            inputs = model.to_tokens(inputs)
        if not isinstance(inputs, Tensor):
            raise InputError(f"inputs must be a tensor of token ids or a string, got {type(inputs).__name__}")
        if inputs.numel() == 0:
            raise InputError("inputs are empty; expected token ids of shape [batch, pos]")
        if not torch.is_floating_point(inputs):
            if inputs.dtype == torch.bool or inputs.is_complex():
                raise InputError(f"token ids must be integers, got dtype {inputs.dtype}")
            if inputs.ndim == 1:
                inputs = inputs[None]
            if inputs.ndim != 2:
                raise InputError(f"token ids must have shape [batch, pos] or [pos], got {tuple(inputs.shape)}")
            if cfg is not None:
                vocab = getattr(cfg, "d_vocab", None)
                lo, hi = int(inputs.min()), int(inputs.max())
                if lo < 0 or (vocab is not None and hi >= vocab):
                    raise InputError(f"token ids must lie in 0..{vocab - 1} (d_vocab={vocab}); got range {lo}..{hi}")
                n_ctx = getattr(cfg, "n_ctx", None)
                if n_ctx is not None and inputs.shape[1] > n_ctx:
                    raise InputError(f"sequence length {inputs.shape[1]} exceeds the model's n_ctx={n_ctx}")
        inputs = inputs.to(device)
        if attention_mask is not None:
            if not isinstance(attention_mask, Tensor) or tuple(attention_mask.shape) != tuple(inputs.shape[:2]):
                got = tuple(attention_mask.shape) if isinstance(attention_mask, Tensor) else type(attention_mask).__name__
                raise InputError(f"attention_mask must have shape {tuple(inputs.shape[:2])} (batch, pos), got {got}")
            attention_mask = attention_mask.to(device)
        return inputs, attention_mask


def _bind(fn: Callable, *args: Any) -> Callable:
    def bound(*rest: Any) -> Any:
        return fn(*args, *rest)

    return bound


# The documented entry point: ``with capture(model, ...) as cap:``.
capture = Capture
