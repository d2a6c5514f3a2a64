"""Tiny random HuggingFace models saved with save_pretrained, for offline loading tests."""

from pathlib import Path

import torch


def _tokenizer(path: Path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for ch in "abcdefghijklmnopqrstuvwxyz .,":
        vocab.setdefault(ch, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="</s>")
    fast.save_pretrained(path)
    return len(vocab)


def _save(model_factory, path: Path, seed: int) -> Path:
    """HF initialises with the global RNG: build inside fork_rng so the tests' RNG is untouched."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_factory()
    model.save_pretrained(path)
    return path


def save_tiny_gpt2(path: Path, *, legacy_n_ctx: bool = True) -> Path:
    """A tiny GPT-2. ``legacy_n_ctx=False`` saves the config as current transformers writes it
    when ``n_ctx`` is not passed: no ``n_ctx`` key, only ``n_positions``."""
    from transformers import GPT2Config, GPT2LMHeadModel

    path.mkdir(parents=True, exist_ok=True)
    _tokenizer(path)
    extra = {"n_ctx": 64} if legacy_n_ctx else {}
    cfg = GPT2Config(vocab_size=64, n_positions=64, n_embd=32, n_layer=2, n_head=4, **extra)
    return _save(lambda: GPT2LMHeadModel(cfg), path, seed=0)


def save_tiny_llama(path: Path) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    path.mkdir(parents=True, exist_ok=True)
    _tokenizer(path)
    cfg = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        head_dim=8,
    )
    return _save(lambda: LlamaForCausalLM(cfg), path, seed=1)


def save_tiny_gemma(path: Path) -> Path:
    """A tiny Gemma (an architecture TransformerLens converts only from its official names)."""
    from transformers import GemmaConfig, GemmaForCausalLM

    path.mkdir(parents=True, exist_ok=True)
    cfg = GemmaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=64)
    return _save(lambda: GemmaForCausalLM(cfg), path, seed=2)
