"""A tiny GGUF file written with the ``gguf`` package from a tiny HuggingFace Llama (float32 tensors,
a word-level vocabulary as a BPE with no merges), so the tests load a real GGUF file from disk."""

import json
from pathlib import Path

import numpy as np
import torch


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's q/k row order (transformers undoes it when it reads a GGUF file)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_tiny_gguf(path: Path, hf_dir: Path, *, tokenizer: bool = True, architecture: str = "llama") -> Path:
    """Write the Llama saved in ``hf_dir`` (see ``hf_fixtures.save_tiny_llama``) as a GGUF file."""
    import gguf
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32, local_files_only=True)
    c = hf.config
    w = gguf.GGUFWriter(str(path), architecture)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_block_count(c.num_hidden_layers)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_key_length(c.head_dim)
    w.add_value_length(c.head_dim)
    w.add_rope_dimension_count(c.head_dim)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_rope_freq_base(float(getattr(c, "rope_theta", None) or 10000.0))
    w.add_vocab_size(c.vocab_size)
    if tokenizer:
        vocab = json.loads((hf_dir / "tokenizer.json").read_text(encoding="utf-8"))["model"]["vocab"]
        tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
        tokens += [f"<extra_{i}>" for i in range(c.vocab_size - len(tokens))]
        w.add_tokenizer_model("gpt2")
        w.add_token_list(tokens)
        w.add_token_types([3 if t.startswith("<") else 1 for t in tokens])
        w.add_token_scores([0.0] * len(tokens))
        w.add_token_merges([])
        w.add_bos_token_id(1)
        w.add_eos_token_id(2)
        w.add_unk_token_id(0)
    sd = {k: v.detach().numpy().astype(np.float32) for k, v in hf.state_dict().items()}
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    per_layer = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
                 "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
                 "post_attention_layernorm": "ffn_norm", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
                 "mlp.down_proj": "ffn_down"}
    for i in range(c.num_hidden_layers):
        for hf_name, g in per_layer.items():
            names[f"model.layers.{i}.{hf_name}.weight"] = f"blk.{i}.{g}.weight"
    for key, name in names.items():
        t = sd[key]
        if name.endswith("attn_q.weight"):
            t = _permute(t, c.num_attention_heads)
        elif name.endswith("attn_k.weight"):
            t = _permute(t, c.num_key_value_heads)
        w.add_tensor(name, np.ascontiguousarray(t))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
