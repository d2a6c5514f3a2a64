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
- Forward-only measurements (attention entropy, value manifolds, the logit lens) ride the same
  path with ``gradients=False``: the pass runs under ``no_grad`` and each layer is handed over as
  soon as its last requested site has fired.
- Hook names, masks and head counts come from the model's backend (:mod:`bayesmanifold.backends`).
"""

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from ..backends import ATTN_SITES, BLOCK_SITES, MODEL_SITES, SITE_ORDER, Batch, model_access
from ..backends.selection import select_heads
from ..errors import InputError, ModelError, ObjectiveError, SelectionError
from .bundle import Accumulator, LayerBundle, OutputBundle, layer_masks, plan_accumulators
from .grad_scope import bind as _bind
from .grad_scope import weights_frozen as _weights_frozen
from .model_state import check_materialised
from .objectives import Objective, next_token_loss, validate_objective_value

__all__ = ["LayerBundle", "OutputBundle", "Accumulator", "Capture", "capture"]


_GRAD_NAMES = ("grad_scores", "grad_pattern", "grad_values", "grad_z")
_GRAD_SITE = {"scores": "grad_scores", "pattern": "grad_pattern", "v": "grad_values", "z": "grad_z"}


@dataclass
class _LayerState:
    acts: dict[str, Tensor] = field(default_factory=dict)
    valid: Tensor | None = None
    grads: dict[str, Tensor] = field(default_factory=dict)
    seen: set[str] = field(default_factory=set)


class Capture:
    """Attach capture hooks to ``model`` for the duration of a ``with`` block (alias: ``capture``).

    Args:
        model: a ``HookedTransformer`` or any ``HookedRootModule`` with TransformerLens hook names.
        accumulators: objects with ``update(bundle)``, ``merge(other)``, ``finalize()``; each
            receives every selected layer's :class:`LayerBundle` (as soon as backward produces it,
            or as soon as the layer has run in a forward-only capture), and, if it has
            ``update_output``, one :class:`OutputBundle` per pass.
        layers: layer index, indices, or None for all.
        heads: head indices for every layer, a ``{layer: heads}`` mapping, or None for all.
        gradients: run the backward pass (None: if any accumulator needs it, or there is none).
        sites: extra sites to deliver in ``bundle.acts`` / ``out.acts`` (see ``backends.base``);
            accumulators' own ``sites`` are added.
        keep: also keep each layer's bundle of the last run in ``cap.kept`` and the output
            bundle in ``cap.output`` (opt-in: memory).
        keep_query_positions: keep only these query positions (slice or indices).
        keep_device: move kept tensors there (e.g. ``"cpu"`` to offload from a GPU).
        objective: default ``fn(logits, inputs) -> scalar`` for :meth:`Capture.run`.
        input_hook: "embed" (default): the embedding output is the gradient leaf (token models); None: float inputs only.

    Example:
        >>> from bayesmanifold.analyses import RoutingLawCheck
        >>> check = RoutingLawCheck()
        >>> with capture(model, accumulators=[check]) as cap:  # doctest: +SKIP
        ...     cap.run(tokens)
        >>> check.finalize().to_dataframe()  # doctest: +SKIP
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        accumulators: Iterable[Any] = (),
        layers: int | Iterable[int] | None = None,
        heads: int | Sequence[int] | Mapping[int, Sequence[int]] | None = None,
        gradients: bool | None = None,
        sites: Iterable[str] = (),
        keep: bool = False,
        keep_query_positions: slice | Sequence[int] | None = None,
        keep_device: str | torch.device | None = None,
        objective: Objective | None = None,
        input_hook: str | None = "embed",
    ) -> None:
        check_materialised(model)
        self.model, self.access = model, model_access(model)
        self._infos = self.access.layers
        self.layers = self.access.norm_layers(layers)
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
        self.accumulators, self.gradients, self.sites = plan_accumulators(accumulators, gradients, sites)
        self.keep = keep
        self.keep_query_positions = keep_query_positions
        if keep_device is not None:
            keep_device = torch.device(keep_device)
            if keep_device.type == "cuda" and not torch.cuda.is_available():
                raise InputError("keep_device='cuda' was asked for but no CUDA GPU is available; use 'cpu' or None")
        self.keep_device = keep_device
        self.objective = objective
        # where the gradient path starts: the backend's embedding output (or None: float inputs only)
        self.input_point = self.access.embed_point() if input_hook is not None else None
        self.kept: dict[int, LayerBundle] = {}
        self.output: OutputBundle | None = None
        self.last_loss: float | None = None
        self._handles: list[Any] = []
        self._active = False
        self._state: dict[int, _LayerState] = {}
        self._leaf: Tensor | None = None
        self._batch: Batch | None = None
        self._n_grads = 0
        self._model_acts: dict[str, Tensor] = {}
        self._masks: tuple[Tensor, Tensor] | None = None  # this pass's (valid, query_valid): see layer_masks
        # Per layer, the forward sites to store (forward-only: the layer goes out once all have fired,
        # in whatever order the backend fires them).
        layer_sites = {"pattern", "v", "scores"} | (self.sites & set(ATTN_SITES + BLOCK_SITES))
        self._layer_sites = sorted(layer_sites | ({"z"} if self.gradients else set()), key=SITE_ORDER.index)

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
        acc = self.access
        if self.input_point is not None and self.gradients:
            self._handles.append(self.input_point.register_forward_hook(self._input_fwd))
        for site in sorted(self.sites & set(MODEL_SITES)):
            self._handles.append(acc.add_forward_hook(site, None, _bind(self._model_fwd, site)))
        for layer in self.layers:
            for site in self._layer_sites:
                self._handles.append(acc.add_forward_hook(site, layer, _bind(self._site_fwd, layer, site)))

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
        self._leaf = output.detach().requires_grad_(True)
        return self._leaf

    def _model_fwd(self, site: str, module: nn.Module, inputs: Any, output: Tensor) -> None:
        if self._active:
            self._model_acts[site] = output.detach()

    def _site_fwd(self, layer: int, site: str, module: nn.Module, inputs: Any, output: Tensor) -> None:
        if not self._active:
            return
        st = self._state.setdefault(layer, _LayerState())
        st.seen.add(site)
        if site == "scores":
            # The mask is the same for every head; head 0's scores say which entries were masked.
            st.valid = self.access.valid_from_scores(output[:, 0].detach())
        if site in ("pattern", "v") or site in self.sites:
            st.acts[site] = output.detach()
        if self.gradients:
            if site in _GRAD_SITE and output.requires_grad:
                output.register_hook(_bind(self._grad_arrived, layer, _GRAD_SITE[site]))
        elif len(st.seen) == len(self._layer_sites):
            self._dispatch(layer)

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
        pattern, values = st.acts.get("pattern"), st.acts.get("v")
        if pattern is None or values is None or st.valid is None:
            return
        n_heads, n_kv = pattern.shape[1], values.shape[2]
        if n_heads % n_kv:
            raise ModelError(f"layer {layer}: {n_heads} query heads are not a multiple of {n_kv} kv heads")
        heads = self._heads_for(layer, n_heads)
        group = n_heads // n_kv
        kv_heads = [h // group for h in heads]
        batch = self._batch
        valid, query_valid = self._masks = layer_masks(st.valid, None if batch is None else batch.attention_mask, self._masks)
        all_heads = len(heads) == n_heads
        idx = torch.tensor(heads, device=pattern.device)

        def sel(t: Tensor, dim: int) -> Tensor:
            return t if all_heads else t.index_select(dim, idx)

        g: dict[str, Tensor | None] = dict.fromkeys(_GRAD_NAMES)
        if self.gradients:
            zeros = {
                "grad_scores": lambda: torch.zeros_like(pattern),
                "grad_pattern": lambda: torch.zeros_like(pattern),
                "grad_values": lambda: torch.zeros_like(values),
                "grad_z": lambda: pattern.new_zeros(pattern.shape[0], pattern.shape[2], n_heads, values.shape[-1]),
            }
            g = {k: st.grads[k] if k in st.grads else zeros[k]() for k in _GRAD_NAMES}
            if not bool(query_valid.all()):
                # Fully masked query rows (left padding) give NaN in ∂L/∂s: they carry no attention.
                g["grad_scores"] = g["grad_scores"].masked_fill(~query_valid[:, None, :, None], 0.0)
            g = {
                "grad_scores": sel(g["grad_scores"], 1),
                "grad_pattern": sel(g["grad_pattern"], 1),
                "grad_z": sel(g["grad_z"], 2),
                "grad_values": g["grad_values"],
            }
        kv_idx = torch.tensor(kv_heads, device=pattern.device)
        bundle = LayerBundle(
            layer=layer,
            heads=heads,
            kv_heads=kv_heads,
            attn_scale=self._infos[layer].attn_scale,
            softmax_dtype=self._infos[layer].softmax_dtype,
            pattern=sel(pattern, 1),
            values=values if group == 1 and all_heads else values.index_select(2, kv_idx),
            valid=valid,
            query_valid=query_valid,
            n_heads=n_heads,
            n_kv_heads=n_kv,
            batch=batch,
            acts={k: v for k, v in st.acts.items() if k in self.sites},
            **g,
        )
        for acc in self.accumulators:
            acc.update(bundle)
        if self.keep:
            self.kept[layer] = bundle.sliced(self.keep_query_positions, self.keep_device)

    # ------------------------------------------------------------------ the pass
    def run(
        self,
        inputs: Any,
        *,
        attention_mask: Tensor | None = None,
        objective: Objective | None = None,
        **forward_kwargs: Any,
    ) -> float | None:
        """Run one forward(+backward) pass and stream every selected layer to the accumulators.

        Args:
            inputs: a :class:`~bayesmanifold.backends.batch.Batch`, token ids ``Int[Tensor, "batch pos"]``
                (or ``"pos"``, any integer dtype), a string or list of strings (tokenised with the
                model's tokenizer; a padded list gets its attention mask), or a float tensor for
                models whose input is not tokens.
            attention_mask: ``Int[Tensor, "batch pos"]``, 1 for real tokens (left or right padding).
            objective: ``fn(logits, inputs) -> scalar``; default next-token cross-entropy.
            **forward_kwargs: passed to the model's forward.

        Returns:
            The objective's value (None in a forward-only pass without an objective).
        """
        if not self._handles:
            raise InputError("capture hooks are not attached: use `with capture(model, ...) as cap:`")
        self.kept = {}
        self.output = None
        batch = self.access.prepare_batch(inputs, attention_mask)
        self._check_keep_positions(batch.tokens.shape[1])
        inputs, attention_mask = batch.tokens, batch.attention_mask
        objective = objective or self.objective
        float_input = torch.is_floating_point(inputs)
        if objective is None and (self.gradients or not float_input):
            if float_input or inputs.shape[-1] < 2:
                raise ObjectiveError(f"the default objective (next-token loss) needs token inputs of at least 2 positions "
                                     f"(got {'floats' if float_input else '1 position'}); pass objective=fn(logits, inputs)")
            objective = next_token_loss(attention_mask)
        self._batch = batch
        call_inputs = inputs
        if self.gradients and (float_input or self.input_point is None):
            if not float_input:
                raise ModelError(
                    f"{type(self.model).__name__} has no hook_embed to start the gradient path from; "
                    "pass float inputs or a model with a hook_embed hook point"
                )
            self._leaf = call_inputs = inputs.detach().clone().requires_grad_(True)
        if attention_mask is not None:
            forward_kwargs["attention_mask"] = attention_mask
        self._n_grads = 0
        self._model_acts = {}
        self._active = True
        try:
            if self.gradients:
                value = self._forward_backward(call_inputs, inputs, objective, forward_kwargs)
            else:
                with torch.no_grad():
                    logits = self.model(call_inputs, **forward_kwargs)
                    self._active = False
                    if self._state:
                        for layer in sorted(self._state):
                            self._dispatch(layer)
                    value = objective(logits, inputs) if objective is not None else None
                self._deliver_output(logits, value)
            self.last_loss = None if value is None else float(value.detach())
            return self.last_loss
        finally:
            self._active = False
            self._state.clear()
            self._leaf = None
            self._batch = None
            self._masks = None
            self._model_acts = {}

    def _forward_backward(self, call_inputs: Tensor, inputs: Tensor, objective: Objective, kwargs: dict) -> Tensor:
        with torch.enable_grad():
            with _weights_frozen(self.model):
                logits = self.model(call_inputs, **kwargs)
            self._active = False
            leaf = self._leaf
            if leaf is None:
                raise ModelError("the input hook never fired: capture could not start a gradient path")
            value = objective(logits, inputs)
            validate_objective_value(value)
            if not self._state:
                raise ObjectiveError("no selected attention layer ran in the forward pass")
            # free the logits (batch × pos × vocab) before the backward pass unless something reads them
            logits = logits.detach() if self.keep or self._output_receivers() else None
            torch.autograd.grad(value, [leaf], allow_unused=True)
        if self._n_grads == 0:
            raise ObjectiveError(
                "the objective has no gradient path to the selected attention layers "
                "(does it depend on the logits?)"
            )
        # Layers the objective does not depend on get zero gradients (there is no flow).
        for layer in sorted(self._state, reverse=True):
            self._dispatch(layer)
        self._deliver_output(logits, value)
        return value

    def _check_keep_positions(self, n: int) -> None:
        qp = self.keep_query_positions
        if self.keep and qp is not None and not isinstance(qp, slice):
            bad = [p for p in qp if not -n <= int(p) < n]
            if bad:
                raise InputError(f"keep_query_positions {bad} out of range for {n} positions; accepted: -{n}..{n - 1}")

    def _output_receivers(self) -> list[Any]:
        return [a for a in self.accumulators if callable(getattr(a, "update_output", None))]

    def _deliver_output(self, logits: Tensor | None, value: Tensor | None) -> None:
        if logits is None or not ((receivers := self._output_receivers()) or self.keep):
            return
        out = OutputBundle(
            batch=self._batch,
            logits=logits,
            loss=None if value is None else float(value.detach()),
            acts=dict(self._model_acts),
        )
        for acc in receivers:
            acc.update_output(out)
        if self.keep:
            self.output = out


# The documented entry point: ``with capture(model, ...) as cap:``.
capture = Capture
