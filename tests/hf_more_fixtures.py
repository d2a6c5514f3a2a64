"""More tiny random HuggingFace causal LMs saved with save_pretrained (GPT-NeoX, Qwen2, Mistral, Gemma).

Folder names look like the ones users have (``pythia-...``, ``Qwen2-...``): loaders must not pick
a built-in config from a folder's name. Each model is initialised under ``torch.random.fork_rng``
with a local seed (HuggingFace initialises from the global RNG), so tests leave it as found.
"""

from pathlib import Path

import torch
from hf_fixtures import _tokenizer

# name -> (transformers config class, model class, config fields)
ARCHITECTURES = {
    "gpt_neox": ("GPTNeoXConfig", "GPTNeoXForCausalLM", dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=64, rotary_pct=0.5)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64)),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=1, max_position_embeddings=64, head_dim=8, sliding_window=None)),
    "gemma": ("GemmaConfig", "GemmaForCausalLM", dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, max_position_embeddings=64)),
}
#: realistic folder names for each architecture
FOLDERS = {
    "gpt_neox": "pythia-14m-tiny-random",
    "qwen2": "Qwen2-0.5B-tiny-random",
    "mistral": "Mistral-7B-v0.1-tiny-random",
    "gemma": "gemma-2b-tiny-random",
}


def save_tiny(arch: str, path: Path, seed: int = 2) -> Path:
    """Save a tiny random ``arch`` model (see :data:`ARCHITECTURES`) and a character tokenizer in ``path``."""
    import transformers

    cfg_name, model_name, fields = ARCHITECTURES[arch]
    path.mkdir(parents=True, exist_ok=True)
    vocab = _tokenizer(path)
    cfg = getattr(transformers, cfg_name)(vocab_size=max(vocab, 64), bos_token_id=1, eos_token_id=2,
                                          pad_token_id=2, **fields)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = getattr(transformers, model_name)(cfg)
    model.save_pretrained(path)
    return path
