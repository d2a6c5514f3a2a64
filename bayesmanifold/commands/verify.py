"""``bayesmanifold verify``: check the routing and value laws against autograd on a model."""

import argparse

from .common import (
    add_json_arg,
    add_model_args,
    add_seed_arg,
    at_least,
    format_table,
    open_model_from,
    text_file,
    tokens_for,
    write_json,
)

NAME = "verify"
HELP = "verify the advantage routing law and the value-update law against autograd, per head"
EXIT_CODES = ("exit codes: 0 the laws hold on every tested head; 1 a law does not hold on some head (or no "
              "gradient reached any head, so nothing was tested); 2 bad input (one line on stderr)")
EXAMPLE = "bayesmanifold verify --model toy --dtype float64 --json out.json"


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_args(p, default="toy")
    p.add_argument("--batch-size", type=at_least(1), default=4)
    p.add_argument("--seq-len", type=at_least(2), default=64)
    p.add_argument("--text", metavar="FILE", type=text_file, help="tokenise this UTF-8 text file instead of random tokens")
    add_seed_arg(p, help="seed of the random tokens and the toy model")
    add_json_arg(p)


def run(args: argparse.Namespace) -> int:
    from ..analyses import verify_routing_law
    model = open_model_from(args).model
    tokens = tokens_for(model, batch_size=args.batch_size, seq_len=args.seq_len, text=args.text, seed=args.seed)
    law, adv = verify_routing_law(model, tokens)
    summary = law.summary()
    adv_df = adv.to_dataframe()
    per_layer = []
    law_df = law.to_dataframe()
    for layer, g in law_df.groupby("layer"):
        a = adv_df[adv_df.layer == layer]
        per_layer.append(
            {
                "layer": int(layer),
                "rel_ds": g["rel_residual_dscores"].max(),
                "abs_ds": g["max_abs_residual_dscores"].max(),
                "abs_dv": g["max_abs_residual_dvalues"].max(),
                "rowsum": g["max_abs_rowsum_dscores"].max(),
                "mass_pos": a["mass_positive"].mean(),
                "top1": a["routing_top1_share"].mean(),
            }
        )
    print(f"model {args.model} ({summary['n_layers']} layers × {summary['n_heads']} heads, {args.dtype}), tokens {tuple(tokens.shape)}")
    print(
        format_table(
            per_layer,
            [
                ("layer", "layer", "d"),
                ("rel_ds", "rel resid ∂L/∂s", ".2e"),
                ("abs_ds", "abs resid ∂L/∂s", ".2e"),
                ("abs_dv", "abs resid ∂L/∂v", ".2e"),
                ("rowsum", "max|Σ_j ∂L/∂s|", ".2e"),
                ("mass_pos", "α mass on A>0", ".3f"),
                ("top1", "routing top-1", ".3f"),
            ],
        )
    )
    print(f"max residual of the routing law: {summary['max_terms_residual_dscores']:.3e} of the summed terms "
          f"Σ_j α_ij|b_ij| of its row (judged per row), {summary['max_rel_residual_dscores']:.3e} of max|∂L/∂s|")
    from ..backends import model_access

    access = model_access(model)
    floor = law.floor or f"the softmax runs in the model's {str(access.dtype).removeprefix('torch.')}"
    print(f"backend {access.name}; numerical floor: {floor} (tolerance {law.rows[0]['tolerance']:.2g} × the size of "
          "the summed terms, per row)")
    print(f"the laws hold on every head: {'yes' if law.holds else 'NO'}" + (f" ({law.reason})" if law.reason else ""))
    summary.update(
        {
            "model": args.model,
            "dtype": args.dtype,
            "device": args.device,
            "batch_size": int(tokens.shape[0]),
            "seq_len": int(tokens.shape[1]),
            "advantage": adv.rows,
            "backend": access.name,
        }
    )
    write_json(args.json, summary)
    return 0 if law.holds else 1
