"""Capture against autograd (run_with_cache as the oracle), streaming, lifetimes, bad input."""

import pytest
import torch
from helpers import hook_count, make_model, needs_hooked, needs_hooked_scores_cache

from bayesmanifold.errors import (
    BayesManifoldError,
    InputError,
    ModelError,
    ObjectiveError,
    SelectionError,
)
from bayesmanifold.hooks import capture, loss_at_positions


class Keep:
    """Test accumulator: clones every bundle it is given."""

    def __init__(self):
        self.bundles = {}

    def update(self, b):
        self.bundles[b.layer] = {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in vars(b).items()}

    def merge(self, other):
        return self

    def finalize(self):
        return self.bundles


VARIANTS = {
    "mha": {},
    "gqa": {"n_key_value_heads": 2},
    "rotary": {"positional_embedding_type": "rotary", "rotary_dim": 8},
    "gqa_rotary": {"n_key_value_heads": 2, "positional_embedding_type": "rotary", "rotary_dim": 8},
    "attn_only": {"attn_only": True},
    "attn_result": {"use_attn_result": True, "use_split_qkv_input": True},
    "alibi": {"positional_embedding_type": "alibi"},
}


def _oracle(model, tokens, attention_mask=None):
    names = lambda n: n.endswith(("hook_pattern", "hook_attn_scores", "hook_v", "hook_z"))  # noqa: E731
    model.zero_grad(set_to_none=True)
    _, cache = model.run_with_cache(tokens, names_filter=names, incl_bwd=True, return_type="loss", attention_mask=attention_mask)
    model.zero_grad(set_to_none=True)
    return cache


@needs_hooked_scores_cache
@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_gradients_match_autograd(variant, dtype, tol, gen):
    model = make_model(dtype=dtype, **VARIANTS[variant])
    tokens = torch.randint(0, 50, (2, 12), generator=gen)
    keep = Keep()
    with capture(model, accumulators=[keep]) as cap:
        loss = cap.run(tokens)
    cache = _oracle(model, tokens)
    assert sorted(keep.bundles) == [0, 1]
    for layer, b in keep.bundles.items():
        pre = f"blocks.{layer}.attn."
        for ours, theirs in [
            ("grad_scores", "hook_attn_scores_grad"),
            ("grad_pattern", "hook_pattern_grad"),
            ("grad_values", "hook_v_grad"),
            ("grad_z", "hook_z_grad"),
            ("pattern", "hook_pattern"),
        ]:
            ref = cache[pre + theirs]
            err = (b[ours] - ref).abs().max() / ref.abs().max().clamp_min(1e-30)
            assert err <= tol, (variant, layer, ours, float(err))
        # The laws hold on the captured tensors (GQA: values are expanded per query head).
        alpha, u, v = b["pattern"], b["grad_z"], b["values"]
        compat = torch.einsum("bqhd,bkhd->bhqk", u, v)
        law = alpha * (compat - (alpha * compat).sum(-1, keepdim=True))
        rel = (law - b["grad_scores"]).abs().max() / b["grad_scores"].abs().max()
        assert rel <= tol
    assert loss > 0


def test_left_padding_excludes_masked_rows(gen):
    model = make_model(dtype=torch.float64)
    tokens = torch.randint(0, 50, (2, 10), generator=gen)
    mask = torch.ones(2, 10, dtype=torch.long)
    mask[0, :4] = 0  # left padding in the first sequence
    keep = Keep()
    with capture(model, accumulators=[keep]) as cap:
        cap.run(tokens, attention_mask=mask)
    for b in keep.bundles.values():
        assert not b["query_valid"][0, :4].any() and b["query_valid"][1].all()
        assert not b["valid"][0, :, :4].any()
        assert torch.isfinite(b["grad_scores"]).all()
        assert (b["grad_scores"][0, :, :4] == 0).all()
        alpha, u, v = b["pattern"], b["grad_z"], b["values"]
        compat = torch.einsum("bqhd,bkhd->bhqk", u, v)
        law = alpha * (compat - (alpha * compat).sum(-1, keepdim=True))
        assert (law - b["grad_scores"]).abs().max() < 1e-14


def test_streaming_equals_kept(gen):
    model = make_model(dtype=torch.float64, n_key_value_heads=2)
    tokens = torch.randint(0, 50, (3, 9), generator=gen)
    keep = Keep()
    with capture(model, accumulators=[keep], keep=True) as cap:
        cap.run(tokens)
        kept = cap.kept
    for layer, b in keep.bundles.items():
        for name in ("pattern", "values", "grad_z", "grad_pattern", "grad_scores", "grad_values", "valid"):
            assert torch.equal(b[name], getattr(kept[layer], name))


def test_keep_query_slice_and_offload(gen):
    model = make_model(dtype=torch.float32)
    tokens = torch.randint(0, 50, (2, 9), generator=gen)
    with capture(model, keep=True, keep_query_positions=slice(-1, None), keep_device="cpu") as cap:
        cap.run(tokens)
    b = cap.kept[1]
    assert b.pattern.shape == (2, 4, 1, 9) and b.grad_z.shape == (2, 1, 4, 8)
    assert b.values.shape == (2, 9, 4, 8)


def test_layer_and_head_selection(gen):
    model = make_model(dtype=torch.float64, n_key_value_heads=2)
    tokens = torch.randint(0, 50, (2, 8), generator=gen)
    keep = Keep()
    with capture(model, accumulators=[keep], layers=[1], heads=[0, 1, 3]) as cap:
        cap.run(tokens)
    b = keep.bundles[1]
    assert list(keep.bundles) == [1]
    assert b["heads"] == [0, 1, 3] and b["kv_heads"] == [0, 0, 1]
    assert b["pattern"].shape[1] == 3 and b["values"].shape[2] == 3 and b["grad_values"].shape[2] == 2


@needs_hooked
def test_no_side_effects(gen):
    model = make_model(dtype=torch.float32)
    tokens = torch.randint(0, 50, (2, 8), generator=gen)
    seen = []
    model.blocks[0].attn.hook_pattern.add_hook(lambda t, hook: seen.append(hook.name))
    p0 = model.W_E
    p0.grad = torch.full_like(p0, 7.0)
    model.blocks[1].attn.W_Q.requires_grad_(False)
    before = hook_count(model)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    with capture(model) as cap:
        cap.run(tokens)
    assert hook_count(model) == before == 1
    assert seen == ["blocks.0.attn.hook_pattern"]
    assert torch.equal(p0.grad, torch.full_like(p0, 7.0))
    assert all(p.grad is None for n, p in model.named_parameters() if n != "embed.W_E")
    assert flags == {n: p.requires_grad for n, p in model.named_parameters()}
    model(tokens)
    assert len(seen) == 2  # the user's hook still fires, ours are gone


def test_frozen_model(gen):
    model = make_model(dtype=torch.float64)
    for p in model.parameters():
        p.requires_grad_(False)
    keep = Keep()
    with capture(model, accumulators=[keep]) as cap:
        cap.run(torch.randint(0, 50, (1, 8), generator=gen))
    assert keep.bundles[0]["grad_scores"].abs().max() > 0
    assert not any(p.requires_grad for p in model.parameters())


def test_weights_frozen_only_during_the_forward(gen):
    """Capture freezes the weights while the forward runs (autograd then saves no activations for
    weight gradients) and restores every flag after, also when the forward raises."""
    model = make_model(dtype=torch.float32)
    list(model.parameters())[1].requires_grad_(False)  # one the user froze stays frozen
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    during = []
    model.blocks[0].attn.hook_pattern.add_hook(
        lambda t, hook: during.append(any(p.requires_grad for p in model.parameters())))

    def fail(t, hook):
        raise RuntimeError("forward failed")

    with capture(model) as cap:
        cap.run(torch.randint(0, 50, (1, 8), generator=gen))
        assert during == [False]
        model.blocks[1].attn.hook_z.add_hook(fail)
        with pytest.raises(RuntimeError, match="forward failed"):
            cap.run(torch.randint(0, 50, (1, 8), generator=gen))
    model.reset_hooks()
    assert flags == {n: p.requires_grad for n, p in model.named_parameters()}
    assert all(p.grad is None for p in model.parameters())


def test_hooks_removed_when_objective_raises(gen):
    model = make_model()
    tokens = torch.randint(0, 50, (1, 8), generator=gen)

    def boom(logits, toks):
        raise RuntimeError("user objective failed")

    with pytest.raises(RuntimeError, match="user objective failed"):
        with capture(model) as cap:
            cap.run(tokens, objective=boom)
    assert hook_count(model) == 0


def test_custom_objective_positions(gen):
    model = make_model(dtype=torch.float64)
    tokens = torch.randint(0, 50, (2, 8), generator=gen)
    keep = Keep()
    with capture(model, accumulators=[keep], objective=loss_at_positions(3)) as cap:
        cap.run(tokens)
    gz = keep.bundles[1]["grad_z"]
    # Causal: queries after position 3 cannot influence the prediction made at position 3.
    assert gz[:, 4:].abs().max() == 0 and gz[:, 3].abs().max() > 0


@pytest.mark.parametrize(
    "objective,match",
    [
        (lambda logits, t: logits.sum(-1), "scalar"),
        (lambda logits, t: torch.tensor(1.0), "gradient path"),
        (lambda logits, t: logits.sum() * float("nan"), "not finite"),
        (lambda logits, t: 3, "scalar tensor"),
    ],
)
def test_bad_objectives(objective, match, gen):
    model = make_model()
    with pytest.raises(ObjectiveError, match=match):
        with capture(model) as cap:
            cap.run(torch.randint(0, 50, (1, 6), generator=gen), objective=objective)
    assert hook_count(model) == 0


def test_bad_inputs(gen):
    model = make_model()
    with pytest.raises(ModelError, match="TransformerLens"):
        capture(torch.nn.Linear(3, 3))
    with pytest.raises(SelectionError, match="out of range"):
        capture(model, layers=[5])
    with pytest.raises(SelectionError, match="head 7"):
        capture(model, heads=[7])
    with pytest.raises(SelectionError, match="not selected"):
        capture(model, layers=[0], heads={1: [0]})
    with capture(model) as cap:
        with pytest.raises(InputError, match="0..49"):
            cap.run(torch.tensor([[1, 2, 99]]))
        with pytest.raises(InputError, match="n_ctx"):
            cap.run(torch.zeros(1, 40, dtype=torch.long))
        with pytest.raises(InputError, match="attention_mask"):
            cap.run(torch.zeros(1, 4, dtype=torch.long), attention_mask=torch.ones(1, 5))
    assert hook_count(model) == 0
    assert issubclass(SelectionError, BayesManifoldError)
