"""The TransformerBridge backend: capture and the gradient laws on TransformerLens bridges.

HuggingFace-backed bridges (tiny random GPT-2, Llama with GQA and rotary, GPT-NeoX, Qwen2, Mistral,
Gemma saved with save_pretrained) run on TransformerLens 3.x and 4.x; native bridges (our configs
and checkpoints through boot_native) on 4.x. Each law is checked against autograd in float64: to
1e-10 where the softmax runs in float64, to 1e-6 where the model takes it in float32 (HuggingFace's
Llama family), and the result says which.
"""

import json
from pathlib import Path

import pytest
import torch
from helpers import HAS_HOOKED, hook_count, make_model, needs_bridge, needs_native_bridge

from bayesmanifold.analyses.routing_law import RoutingLawCheck, verify_routing_law
from bayesmanifold.backends import model_access
from bayesmanifold.errors import ModelError, ObjectiveError
from bayesmanifold.hooks.capture import capture

HF_ARCHS = ("gpt2", "llama", "gpt_neox", "qwen2", "mistral", "gemma")
FLOAT32_SOFTMAX = {"llama", "qwen2", "mistral", "gemma"}  # HF eager attention: softmax(dtype=float32)


def _hf_dir(arch, hf_gpt2_dir, hf_llama_dir, hf_more_dirs):
    return {"gpt2": hf_gpt2_dir, "llama": hf_llama_dir, **hf_more_dirs}[arch]


def _hf_bridge(path, dtype=torch.float64, compat=False):
    from bayesmanifold.backends.bridge_loading import load_hf_bridge

    model = load_hf_bridge(path, dtype=dtype)
    if compat:
        model.enable_compatibility_mode(no_processing=True, disable_warnings=True)
    return model


def _native(**overrides):
    from bayesmanifold.backends.bridge_loading import build_native

    cfg = dict(n_layers=2, d_model=32, n_heads=4, d_head=8, d_mlp=64, d_vocab=50, n_ctx=32, act_fn="gelu",
               normalization_type="LN")
    cfg.update(overrides)
    with torch.random.fork_rng(devices=[]):
        return build_native(cfg, seed=0, dtype=torch.float64)


def _check_laws(law, float32_softmax):
    assert law.holds, law.reason
    assert law.n_tested == len(law.rows)
    if float32_softmax:
        assert "float32" in law.floor
        assert law.max_rel_residual_dscores <= 1e-6
    else:
        assert law.floor == ""
        assert law.max_rel_residual_dscores <= 1e-10
    assert law.max_rel_residual_dvalues <= 1e-10


# ---------------------------------------------------------------------- the laws per architecture
@needs_bridge
@pytest.mark.parametrize("arch", HF_ARCHS)
def test_laws_on_hf_bridges(arch, hf_gpt2_dir, hf_llama_dir, hf_more_dirs, gen):
    model = _hf_bridge(_hf_dir(arch, hf_gpt2_dir, hf_llama_dir, hf_more_dirs))
    access = model_access(model)
    assert access.name == "TransformerBridge"
    tokens = torch.randint(3, 30, (3, 12), generator=gen)
    law, adv = verify_routing_law(model, tokens)
    _check_laws(law, arch in FLOAT32_SOFTMAX)
    assert law.to_dict()["floor"] == law.floor
    assert adv is not None
    # the divisor of q·k, as on a HookedTransformer (HF keeps a multiplier)
    assert access.layers[0].attn_scale == pytest.approx(8**0.5)
    with capture(model, keep=True) as cap:
        cap.run(tokens)
    assert cap.kept[0].softmax_dtype == (torch.float32 if arch in FLOAT32_SOFTMAX else None)
    assert cap.access.softmax_dtype == cap.kept[0].softmax_dtype


@needs_native_bridge
@pytest.mark.parametrize("overrides", [{}, dict(positional_embedding_type="rotary", rotary_dim=8, n_key_value_heads=2),
                                       dict(normalization_type="RMSPre"), dict(attn_only=True, d_mlp=None)])
def test_laws_on_native_bridges(overrides, gen):
    model = _native(**overrides)
    law, _ = verify_routing_law(model, torch.randint(0, 50, (3, 12), generator=gen))
    _check_laws(law, False)


@needs_native_bridge
def test_native_scores_are_the_softmax_input_not_hook_attn_scores(gen):
    """boot_native fires hook_attn_scores after the softmax; the backend reads the softmax's input."""
    model = _native()
    tokens = torch.randint(0, 50, (2, 10), generator=gen)
    with capture(model, gradients=False, sites=("scores",), keep=True) as cap:
        cap.run(tokens)
    b = cap.kept[0]
    scores = b.acts["scores"]
    assert torch.allclose(torch.softmax(scores, -1), b.pattern, atol=1e-14)
    assert not torch.allclose(scores, b.pattern)


# ---------------------------------------------------------------------- shapes and head subsets
@needs_bridge
def test_sites_have_transformer_lens_shapes(hf_llama_dir, gen):
    model = _hf_bridge(hf_llama_dir)
    tokens = torch.randint(3, 30, (2, 9), generator=gen)
    with capture(model, sites=("q", "k", "v", "z", "scores", "resid_pre", "resid_post", "embed", "final"),
                 keep=True) as cap:
        cap.run(tokens)
    b = cap.kept[1]
    assert b.acts["q"].shape == (2, 9, 4, 8) and b.acts["k"].shape == (2, 9, 2, 8)
    assert b.acts["v"].shape == (2, 9, 2, 8) and b.acts["z"].shape == (2, 9, 4, 8)
    assert b.values.shape == (2, 9, 4, 8) and b.grad_values.shape == (2, 9, 2, 8)
    assert b.grad_z.shape == (2, 9, 4, 8) and b.grad_scores.shape == (2, 4, 9, 9)
    assert b.acts["resid_post"].shape == (2, 9, 32)
    assert cap.output.acts["final"].shape == (2, 9, 32)
    # the final site is what the unembedding reads
    access = model_access(model)
    assert torch.allclose(access.unembed(cap.output.acts["final"]), cap.output.logits, atol=1e-12)
    # z is pattern · v per head (v expanded over the GQA group)
    z = torch.einsum("bhqk,bkhd->bqhd", b.pattern, b.values)
    assert torch.allclose(z, b.acts["z"], atol=1e-12)


@needs_bridge
def test_gqa_head_subsets(hf_llama_dir, gen):
    model = _hf_bridge(hf_llama_dir)
    tokens = torch.randint(3, 30, (2, 10), generator=gen)
    with capture(model, keep=True) as cap:
        cap.run(tokens)
    full = cap.kept
    with capture(model, heads=[1, 2], keep=True) as cap:
        cap.run(tokens)
    for layer, b in cap.kept.items():
        assert b.heads == [1, 2] and b.kv_heads == [0, 1]
        assert torch.equal(b.pattern, full[layer].pattern[:, [1, 2]])
        assert torch.equal(b.grad_scores, full[layer].grad_scores[:, [1, 2]])
        assert torch.equal(b.values, full[layer].values[:, :, [1, 2]])
        assert b.group_complete == [False, False]
    law, _ = verify_routing_law(model, tokens, heads=[0, 1], advantage_stats=False)
    assert law.holds, law.reason
    assert [r["value_law_checked"] for r in law.rows] == [True, True] * 2


# ---------------------------------------------------------------------- masks and padding
def _left_padded(gen, vocab=30, n=10, pad=3):
    tokens = torch.randint(3, vocab, (2, n), generator=gen)
    mask = torch.ones(2, n, dtype=torch.long)
    tokens[1, :pad] = 2
    mask[1, :pad] = 0
    return tokens, mask


@needs_bridge
@pytest.mark.parametrize("arch,compat,dtype", [("gpt2", False, torch.float64), ("gpt2", True, torch.float64),
                                               ("llama", True, torch.float64), ("llama", False, torch.float32)])
def test_left_padding(arch, compat, dtype, hf_gpt2_dir, hf_llama_dir, hf_more_dirs, gen):
    from transformer_lens.model_bridge.generalized_components.attention import AttentionBridge

    model = _hf_bridge(_hf_dir(arch, hf_gpt2_dir, hf_llama_dir, hf_more_dirs), dtype=dtype, compat=compat)
    tokens, mask = _left_padded(gen)
    if compat and not hasattr(AttentionBridge, "_masked_softmax"):
        # TransformerLens 3.x: NaN from fully masked rows reaches every gradient; refused, not mis-measured
        with pytest.raises(ModelError, match="left padding"), capture(model) as cap:
            cap.run(tokens, attention_mask=mask)
        return
    check = RoutingLawCheck()
    with capture(model, accumulators=[check], keep=True) as cap:
        loss = cap.run(tokens, attention_mask=mask)
    assert loss == loss  # not NaN
    law = check.finalize()
    assert law.holds, law.reason
    b = cap.kept[0]
    assert not b.query_valid[1, :3].any() and b.query_valid[1, 3:].all() and b.query_valid[0].all()
    assert not b.valid[1, 3:, :3].any()  # real queries never see the pads (pad rows: see query_valid)
    assert torch.isfinite(b.grad_scores).all()
    # the real tokens of the padded row see what they see without padding
    with capture(model, keep=True) as cap:
        cap.run(tokens[1:, 3:])
    tol = 1e-10 if dtype == torch.float64 else 1e-5
    assert torch.allclose(b.pattern[1, :, 3:, 3:], cap.kept[0].pattern[0], atol=tol)


@needs_bridge
@pytest.mark.parametrize("arch,side", [("gpt2", "left"), ("gpt2", "right"), ("llama", "right")])
def test_valid_sets_equal_in_both_bridge_modes(arch, side, hf_gpt2_dir, hf_llama_dir, hf_more_dirs, gen):
    """Default mode masks with finfo.min, compatibility mode with -inf: the same entries are valid."""
    from transformer_lens.model_bridge.generalized_components.attention import AttentionBridge

    if side == "left" and not hasattr(AttentionBridge, "_masked_softmax"):
        pytest.skip("TransformerLens 3.x bridges in compatibility mode leak NaN from left padding (refused, see test_left_padding)")
    path = _hf_dir(arch, hf_gpt2_dir, hf_llama_dir, hf_more_dirs)
    tokens, mask = _left_padded(gen)
    if side == "right":
        tokens, mask = tokens.flip(1), mask.flip(1)
    kept = []
    for compat in (False, True):
        with capture(_hf_bridge(path, compat=compat), gradients=False, keep=True) as cap:
            cap.run(tokens, attention_mask=mask)
        kept.append(cap.kept)
    for layer in kept[0]:
        # pad query rows carry no attention (query_valid); a mode may leave their pad keys unmasked
        valid = [k[layer].valid & k[layer].query_valid[..., None] for k in kept]
        assert torch.equal(valid[0], valid[1])
        assert torch.equal(kept[0][layer].query_valid, kept[1][layer].query_valid)
        assert valid[0].sum() < valid[0].numel()  # something is masked
        assert torch.equal(kept[0][layer].valid[0], torch.ones(10, 10).tril().bool())


@needs_native_bridge
def test_native_left_padding(gen):
    model = _native()
    tokens, mask = _left_padded(gen, vocab=50)
    law, _ = verify_routing_law(model, tokens, attention_mask=mask)
    assert law.holds, law.reason


# ---------------------------------------------------------------------- no side effects
def _bridges(hf_gpt2_dir):
    out = [_hf_bridge(hf_gpt2_dir)]
    if not HAS_HOOKED:
        out.append(_native())
    return out


@needs_bridge
def test_no_hook_left_after_success_or_raising_objective(hf_gpt2_dir, gen):
    for model in _bridges(hf_gpt2_dir):
        tokens = torch.randint(3, 30, (2, 8), generator=gen)
        model(tokens)  # a bridge wires its own internal hooks on the first forward
        before = hook_count(model)
        verify_routing_law(model, tokens)
        assert hook_count(model) == before

        def bad(logits, inputs):
            raise RuntimeError("objective failed")

        with pytest.raises(RuntimeError, match="objective failed"):
            verify_routing_law(model, tokens, objective=bad)
        assert hook_count(model) == before
        with pytest.raises(ObjectiveError):
            verify_routing_law(model, tokens, objective=lambda logits, inputs: logits.sum().detach())
        assert hook_count(model) == before


@needs_bridge
def test_grad_and_requires_grad_untouched_and_frozen_models(hf_gpt2_dir, gen):
    for model in _bridges(hf_gpt2_dir):
        tokens = torch.randint(3, 30, (2, 8), generator=gen)
        params = list(model.parameters())
        marker = torch.full_like(params[0], 7.0)
        params[0].grad = marker
        flags = [p.requires_grad for p in params]
        law, _ = verify_routing_law(model, tokens)
        assert law.holds
        assert params[0].grad is marker and all(p.grad is None for p in params[1:])
        assert [p.requires_grad for p in params] == flags
        params[0].grad = None
        for p in params:
            p.requires_grad_(False)
        law, _ = verify_routing_law(model, tokens)
        assert law.holds, law.reason
        assert all(not p.requires_grad and p.grad is None for p in params)


@needs_bridge
def test_attention_without_softmax_is_refused(hf_gpt2_dir):
    from transformer_lens.model_bridge import TransformerBridge
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(str(hf_gpt2_dir), dtype=torch.float64, attn_implementation="sdpa")
    model = TransformerBridge.boot_transformers(str(hf_gpt2_dir), dtype=torch.float64, device="cpu")
    inner = model.blocks[0].attn.original_component
    if getattr(getattr(inner, "config", None), "_attn_implementation", None) in (None, "eager"):
        inner.config._attn_implementation = "sdpa"  # what a user-loaded SDPA model looks like
    del hf
    with pytest.raises(ModelError, match="eager"):
        model_access(model)


@needs_native_bridge
def test_native_rotary_q_k_sites_give_the_scores(gen):
    """boot_native applies rotary inline (hook_rot_q never fires): q and k are read at its q·kᵀ."""
    model = _native(positional_embedding_type="rotary", rotary_dim=8, n_key_value_heads=2)
    access = model_access(model)
    assert access.has_site("q", 0) and access.has_site("k", 0)
    with capture(model, gradients=False, sites=("q", "k", "scores"), keep=True) as cap:
        cap.run(torch.randint(0, 50, (2, 10), generator=gen))
    for b in cap.kept.values():
        q, k = b.acts["q"], b.acts["k"]
        assert q.shape == (2, 10, 4, 8) and k.shape == (2, 10, 2, 8)
        s = torch.einsum("bqhd,bkhd->bhqk", q, k.repeat_interleave(2, dim=2)) / b.attn_scale
        assert torch.allclose(s.masked_fill(~b.valid[:, None], 0), b.acts["scores"].masked_fill(~b.valid[:, None], 0), atol=1e-12)


# ---------------------------------------------------------------------- loading and checkpoints
FIXTURE = Path(__file__).parent.parent / "fixtures" / "bijection_v20_logits.json"


def test_shipped_checkpoint_logits_equal_the_hooked_transformers():
    """bijection-v20's logits, recorded on TransformerLens 3.x, on this TransformerLens (4.x: a native bridge)."""
    from bayesmanifold.models.checkpoint import load_checkpoint

    rec = json.loads(FIXTURE.read_text())
    model, _, _, _ = load_checkpoint(rec["checkpoint"])
    with torch.no_grad():
        logits = model(torch.tensor(rec["tokens"]))
    expect = torch.tensor(rec["logits"], dtype=torch.float32)
    assert logits.dtype == torch.float32
    assert (logits - expect).abs().max().item() <= 1e-5
    law, _ = verify_routing_law(model, torch.tensor(rec["tokens"]))
    assert law.holds, law.reason


@needs_native_bridge
def test_make_model_matches_hooked_initialisation():
    """make_model on TransformerLens 4 is the native bridge with the HookedTransformer's weights."""
    from bayesmanifold.backends.bridge_loading import to_bridge_state_dict, to_hooked_state_dict

    for overrides in ({}, dict(positional_embedding_type="rotary", rotary_dim=4, n_key_value_heads=2)):
        model = make_model(**overrides)
        hooked = to_hooked_state_dict(model.state_dict(), model.cfg)
        again = to_bridge_state_dict(hooked, model.cfg)
        assert all(torch.equal(again[k], v) for k, v in model.state_dict().items())
        assert hooked["embed.W_E"].std().item() == pytest.approx(0.8 / 32**0.5, rel=0.1)


@needs_native_bridge
def test_hf_directory_bridge_logits_equal_huggingface(hf_llama_dir, gen):
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(str(hf_llama_dir), dtype=torch.float64, attn_implementation="eager")
    model = _hf_bridge(hf_llama_dir)
    tokens = torch.randint(3, 30, (2, 10), generator=gen)
    with torch.no_grad():
        assert torch.allclose(model(tokens), hf(tokens).logits, atol=1e-12)
