"""The one engine beyond the gradient laws: forward-only passes, extra sites, the output bundle,
the Batch value, the model-access layer, selections and interventions."""

import numpy as np
import pytest
import torch
from helpers import hook_count, make_model, needs_hooked_scores_cache

from bayesmanifold.errors import ConfigError, InputError, SelectionError
from bayesmanifold.hooks import (
    Batch,
    capture,
    model_access,
    position_mask,
    select_heads,
    select_layers,
)
from bayesmanifold.hooks.interventions import ablated_head, parameter_names, stepped_copy


class Collect:
    """A forward-only test accumulator that records what it was given."""

    needs_gradients = False

    def __init__(self, sites=()):
        self.sites = tuple(sites)
        self.bundles, self.outputs = {}, []

    def update(self, b):
        self.bundles[b.layer] = b

    def update_output(self, out):
        self.outputs.append(out)

    def merge(self, other):
        return self

    def finalize(self):
        return self.bundles


def _cache(model, tokens, **kw):
    _, cache = model.run_with_cache(tokens, **kw)
    return cache


@needs_hooked_scores_cache
def test_forward_only_matches_run_with_cache(gen):
    model = make_model(dtype=torch.float64, n_key_value_heads=2, positional_embedding_type="rotary", rotary_dim=8)
    tokens = torch.randint(0, 50, (2, 10), generator=gen)
    acc = Collect(sites=("q", "k", "z", "scores", "resid_pre", "resid_post", "final"))
    with capture(model, accumulators=[acc]) as cap:
        assert not cap.gradients
        loss = cap.run(tokens)
    cache = _cache(model, tokens)
    with torch.no_grad():
        assert loss == pytest.approx(float(model(tokens, return_type="loss")), rel=1e-12)
    for layer, b in acc.bundles.items():
        assert b.grad_scores is None and b.grad_z is None and not b.has_gradients
        assert torch.equal(b.pattern, cache[f"blocks.{layer}.attn.hook_pattern"])
        assert torch.equal(b.acts["q"], cache[f"blocks.{layer}.attn.hook_rot_q"])
        assert torch.equal(b.acts["k"], cache[f"blocks.{layer}.attn.hook_rot_k"])
        assert torch.equal(b.acts["resid_post"], cache[f"blocks.{layer}.hook_resid_post"])
        assert torch.equal(b.acts["resid_pre"], cache[f"blocks.{layer}.hook_resid_pre"])
        assert b.values.shape[2] == 4  # expanded per query head under GQA
        assert torch.equal(b.batch.tokens, tokens)
    (out,) = acc.outputs
    assert torch.equal(out.acts["final"], cache["ln_final.hook_normalized"])
    assert torch.allclose(out.logits, model(tokens))
    assert hook_count(model) == 0


def test_forward_only_streams_layer_by_layer(gen):
    """A forward-only layer is handed over before the next layer runs (nothing is held back)."""
    model = make_model()
    order = []

    class Spy(Collect):
        def update(self, b):
            order.append(("bundle", b.layer))

    user = [model.blocks[1].attn.hook_pattern.add_hook(lambda t, hook: order.append(("user", 1)))]
    with capture(model, accumulators=[Spy()]) as cap:
        cap.run(torch.randint(0, 50, (1, 6), generator=gen))
    assert order == [("bundle", 0), ("user", 1), ("bundle", 1)]
    assert user and hook_count(model) == 1
    model.reset_hooks()


def test_backward_capture_delivers_sites_and_output(gen):
    model = make_model(dtype=torch.float64)
    tokens = torch.randint(0, 50, (2, 8), generator=gen)

    class Both(Collect):
        needs_gradients = True

    acc = Both(sites=("resid_post",))
    with capture(model, accumulators=[acc]) as cap:
        loss = cap.run(Batch(tokens=tokens, labels={"y": torch.arange(2)}))
    cache = _cache(model, tokens)
    for layer, b in acc.bundles.items():
        assert b.has_gradients
        assert torch.equal(b.acts["resid_post"], cache[f"blocks.{layer}.hook_resid_post"])
        assert torch.equal(b.batch.label("y"), torch.arange(2))
    assert acc.outputs[0].loss == pytest.approx(loss)


def test_gradients_false_refuses_gradient_accumulators():
    model = make_model()

    class NeedsGrad:
        def update(self, b): ...

    with pytest.raises(InputError, match="NeedsGrad need the backward pass"):
        capture(model, accumulators=[NeedsGrad()], gradients=False)
    with pytest.raises(SelectionError, match="unknown sites"):
        capture(model, sites=("mlp_out",))
    with pytest.raises(InputError, match="list of objects"):
        capture(model, accumulators=Collect())
    assert hook_count(model) == 0


def test_keep_output_and_forward_kept(gen):
    model = make_model()
    tokens = torch.randint(0, 50, (2, 7), generator=gen)
    with capture(model, gradients=False, sites=("scores",), keep=True) as cap:
        assert cap.run(tokens) is not None  # tokens: the default objective is evaluated
    assert sorted(cap.kept) == [0, 1] and cap.output is not None
    assert cap.kept[0].acts["scores"].shape == (2, 4, 7, 7)


def test_text_lists_are_padded_with_a_mask(hf_gpt2_dir):
    """Strings of different lengths: pad tokens enter neither the loss nor the statistics."""
    from bayesmanifold.backends import load_hf_directory

    model = load_hf_directory(hf_gpt2_dir, dtype="float64")
    texts = ["hello world, again", "hi"]
    with capture(model) as cap:
        batched = cap.run(texts)
    with torch.no_grad():
        per = [model(model.to_tokens(t), return_type="loss", loss_per_token=True)[0] for t in texts]
    weighted = float(torch.cat(per).mean())
    assert batched == pytest.approx(weighted, rel=1e-10)


def test_integer_dtypes_and_layer_types(gen):
    model = make_model(dtype=torch.float64)
    tokens = torch.randint(0, 50, (2, 8), generator=gen)
    with capture(model, layers=np.int64(1)) as cap:
        a = cap.run(tokens.to(torch.int32))
        b = cap.run(tokens.numpy().astype(np.int16))
    assert cap.layers == [1] and a == b
    with pytest.raises(SelectionError, match="layers must be"):
        capture(model, layers="0")


def test_keep_query_positions_checked_before_the_pass(gen):
    model = make_model()
    with capture(model, keep=True, keep_query_positions=[0, 9]) as cap:
        with pytest.raises(InputError, match="keep_query_positions"):
            cap.run(torch.randint(0, 50, (1, 6), generator=gen))
    if not torch.cuda.is_available():
        with pytest.raises(InputError, match="CUDA"):
            capture(model, keep=True, keep_device="cuda")
    assert hook_count(model) == 0


def test_batch_value():
    t = torch.zeros(2, 5, dtype=torch.long)
    mask = torch.tensor([[0, 1, 1, 1, 1], [1, 1, 1, 1, 1]])
    b = Batch(tokens=t, attention_mask=mask, positions=position_mask("last", 2, 5), labels={"h": torch.ones(2)})
    assert b.scored.tolist() == [[False] * 4 + [True]] * 2
    with pytest.raises(InputError, match="no label 'g'"):
        b.label("g")
    with pytest.raises(InputError, match="shape"):
        Batch(tokens=t, attention_mask=torch.ones(2, 4))
    with pytest.raises(InputError, match="one per sequence"):
        Batch(tokens=t, labels={"h": torch.ones(3)})
    with pytest.raises(TypeError):
        b.labels["x"] = torch.ones(2)  # read-only
    assert position_mask("last", 2, 5, mask)[:, -1].all()
    assert position_mask([0, -1], 1, 5).tolist() == [[True, False, False, False, True]]
    with pytest.raises(InputError, match="out of range"):
        position_mask(7, 1, 5)


def test_model_access_facts():
    model = make_model(n_key_value_heads=2)
    acc = model_access(model)
    assert (acc.n_layers, acc.n_heads, acc.n_kv_heads, acc.d_head) == (2, 4, 2, 8)
    assert [acc.kv_of_head(h) for h in range(4)] == [0, 0, 1, 1]
    assert acc.hook_name("pattern", 1) == "blocks.1.attn.hook_pattern"
    assert acc.hook_name("final") == ("ln_final.hook_out" if acc.name == "TransformerBridge" else "ln_final.hook_normalized")
    assert acc.layers[0].attn_scale == pytest.approx(8**0.5)
    assert acc.key_weights(0)[0].shape == (2, 32, 8)
    with pytest.raises(SelectionError, match="per layer"):
        acc.hook_name("pattern")
    with pytest.raises(InputError, match="0..49"):
        acc.as_tokens(torch.tensor([[1, 50]]))
    with pytest.raises(InputError, match="integer"):
        acc.as_tokens(torch.zeros(1, 3))


def test_selections():
    infos = dict.fromkeys(range(3))
    assert select_layers(infos, None) == [0, 1, 2]
    assert select_layers(infos, [-1, 0, 0]) == [0, 2]
    assert select_heads(4, [np.int64(3), -4], layer=0) == [0, 3]
    with pytest.raises(SelectionError, match="out of range"):
        select_layers(infos, 3)
    with pytest.raises(SelectionError, match="accepted: 0..3"):
        select_heads(4, [4], layer=1)
    with pytest.raises(SelectionError, match="empty"):
        select_heads(4, [], layer=0)


def test_stepped_copy_is_gradient_descent(gen):
    model = make_model(dtype=torch.float64)
    tokens = torch.randint(0, 50, (2, 8), generator=gen)
    names = parameter_names(model, "qk", layers=[1])
    # a bridge names its parameters after the wrapped modules (layers.1._original_component.attn...)
    assert names and all(n.startswith("blocks.1.attn.") or n.startswith("layers.1.") and ".attn." in n for n in names)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    new, loss0 = stepped_copy(model, tokens, lr=0.1, params=names)
    params = dict(model.named_parameters())
    loss = model(tokens, return_type="loss")
    grads = torch.autograd.grad(loss, [params[n] for n in names])
    for n, g in zip(names, grads):
        assert torch.allclose(dict(new.named_parameters())[n], params[n] - 0.1 * g, atol=1e-14)
    untouched = [n for n in params if n not in names]
    assert all(torch.equal(dict(new.named_parameters())[n], params[n]) for n in untouched)
    assert loss0 == pytest.approx(float(loss))
    assert flags == {n: p.requires_grad for n, p in model.named_parameters()}
    assert all(p.grad is None for p in model.parameters())
    with pytest.raises(ConfigError, match="lr"):
        stepped_copy(model, tokens, lr=-1.0)


def test_ablated_head(gen):
    model = make_model(dtype=torch.float64)
    tokens = torch.randint(0, 50, (1, 6), generator=gen)
    clean = model(tokens)
    with ablated_head(model, 1, 2):
        _, cache = model.run_with_cache(tokens, names_filter="blocks.1.attn.hook_z")
        ablated = model(tokens)
    assert (cache["blocks.1.attn.hook_z"][:, :, 2] == 0).all()
    assert not torch.allclose(clean, ablated)
    assert hook_count(model) == 0
    assert torch.equal(model(tokens), clean)


def test_one_group_at_a_time_equals_a_stepped_copy_per_group(gen):
    """One copy and one backward for every group give the same weights as a copy per group."""
    from bayesmanifold.backends import toy_model
    from bayesmanifold.hooks.interventions import stepped_one_group_at_a_time

    model = toy_model(n_layers=2, d_model=32, n_heads=4, dtype="float64")
    tokens = torch.randint(0, 256, (2, 16), generator=gen)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    groups = {layer: parameter_names(model, "qk", layers=[layer]) for layer in (0, 1)}
    for layer, stepped in stepped_one_group_at_a_time(model, tokens, lr=1e-2, groups=groups):
        ref, _ = stepped_copy(model, tokens, lr=1e-2, params=groups[layer])
        ours, theirs = dict(stepped.named_parameters()), dict(ref.named_parameters())
        moved = [n for n in ours if not torch.equal(ours[n], before[n])]
        assert moved and set(moved) <= set(groups[layer])  # only this group's step is applied
        for n in ours:
            assert torch.allclose(ours[n], theirs[n], rtol=0, atol=1e-15), n
    for n, p in model.named_parameters():  # the user's model is untouched
        assert torch.equal(p, before[n])
