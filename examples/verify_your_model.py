"""Verify the advantage routing law on your own TransformerLens model, and look at its advantages.

Shows: attaching capture to any TransformerLens model, streaming the law check and the advantage
statistics over several batches, a custom objective (the loss at the last position only), and the
one-step check (does a small gradient step move attention toward positive-advantage keys?).

    python examples/verify_your_model.py            # a 4-layer model built from a config
    python examples/verify_your_model.py --quick    # smaller and faster
"""

import sys

import torch

from bayesmanifold import AdvantageStats, RoutingLawCheck, capture, one_step_check
from bayesmanifold.backends import build_model
from bayesmanifold.hooks import loss_at_positions

quick = "--quick" in sys.argv
cfg = dict(
    n_layers=2 if quick else 4, d_model=64, n_heads=4, d_head=16, d_mlp=256, d_vocab=100,
    n_ctx=64, act_fn="gelu", normalization_type="LN", n_key_value_heads=2,
    positional_embedding_type="rotary", rotary_dim=16,
)
# Seeded weights without touching the caller's RNG. Any TransformerLens model works here: this builds a
# the classic hooked model on TransformerLens 2.18/3.x and a native TransformerBridge on 4.x.
model = build_model(cfg, seed=0, dtype="float64").eval()
gen = torch.Generator().manual_seed(0)
batches = [torch.randint(0, 100, (4, 32), generator=gen) for _ in range(2 if quick else 8)]

# 1. Stream the law check and the advantage statistics over batches (one pass each).
check, adv = RoutingLawCheck(), AdvantageStats()
with capture(model, accumulators=[check, adv]) as cap:
    for tokens in batches:
        cap.run(tokens)
law = check.finalize()
print(f"max relative residual of dL/ds = a(b - b̄): {law.max_rel_residual_dscores:.2e}")
print(f"max |sum_j dL/ds_ij| (routing only redistributes): {law.max_abs_rowsum_dscores:.2e}")
print(adv.finalize().to_dataframe()[["layer", "head", "frac_positive", "mass_positive", "routing_top1_share"]])

# 2. Any scalar objective: here the next-token loss at the last position only.
check2 = RoutingLawCheck()
with capture(model, accumulators=[check2], objective=loss_at_positions(-2)) as cap:
    cap.run(batches[0])
print(f"law residual with a last-position objective: {check2.finalize().max_rel_residual_dscores:.2e}")

# 3. One small step on each layer's W_Q/W_K (on a copy): where did attention go?
step = one_step_check(model, batches[0], lr=1e-3, scope="layer_qk")
print(step.to_dataframe()[["layer", "head", "gain_share_positive", "corr_ds_alpha_adv"]])
