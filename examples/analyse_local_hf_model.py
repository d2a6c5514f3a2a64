"""Analyse a HuggingFace model directory offline: load it, verify the laws, advantage statistics.

Pass a directory written by ``save_pretrained`` (any architecture TransformerLens converts:
GPT-2, Llama with grouped-query attention and rotary, Pythia, ...). With ``--quick`` and no
directory, a tiny random GPT-2 is saved to a temporary folder first, so the script runs anywhere.

    python examples/analyse_local_hf_model.py /path/to/model_dir [--text FILE]
    python examples/analyse_local_hf_model.py --quick
"""

import sys
import tempfile
from pathlib import Path

import torch

from bayesmanifold import load_model, verify_routing_law

args = [a for a in sys.argv[1:] if not a.startswith("--")]
if args:
    path = Path(args[0])
else:
    from transformers import GPT2Config, GPT2LMHeadModel

    path = Path(tempfile.mkdtemp()) / "tiny-gpt"
    GPT2LMHeadModel(GPT2Config(vocab_size=128, n_positions=64, n_ctx=64, n_embd=32, n_layer=2, n_head=4, bos_token_id=0, eos_token_id=0)).save_pretrained(path)

model = load_model(str(path), dtype="float64")  # offline: reads config and weights from disk
text = Path(sys.argv[sys.argv.index("--text") + 1]).read_text() if "--text" in sys.argv else None
if text is not None and model.tokenizer is not None:
    tokens = model.to_tokens(text)[:, : model.cfg.n_ctx]
else:
    tokens = torch.randint(0, model.cfg.d_vocab, (2, 32), generator=torch.Generator().manual_seed(0))
law, adv = verify_routing_law(model, tokens)
print(f"{path.name}: {model.cfg.n_layers} layers x {model.cfg.n_heads} heads")
print(f"routing law, max relative residual: {law.max_rel_residual_dscores:.2e}")
print(f"value law, max relative residual:   {law.max_rel_residual_dvalues:.2e}")
print(adv.to_dataframe().groupby("layer")[["mass_positive", "routing_effective_keys"]].mean())
