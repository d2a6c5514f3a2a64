"""``bayesmanifold analyze``: the geometry and dynamics analyses on a checkpoint or a model.

On a wind-tunnel checkpoint (or a model given with ``--task``): key orthogonality of the
hypothesis-token keys, the value manifold at the scored positions coloured by Bayes entropy,
attention focusing, query–key alignment, value specialization over position buckets and, where
the checkpoint has a dynamics-monitor state or weight snapshots, the frame/precision stabilisation
steps. On a pretrained model with ``--prompts``: Paper III's protocol at each prompt's final token.
"""

import argparse
import json
from typing import Any

import numpy as np
import torch

from ..analyses.suite import load_target, text_suite, windtunnel_suite
from ..errors import InputError
from ..io import ensure_dir
from .common import add_device_arg, add_json_arg, add_target_args, format_table, write_json

NAME = "analyze"
HELP = "measure key orthogonality, value manifolds, attention focusing, specialization and training dynamics"
EXAMPLE = "bayesmanifold analyze bijection-v20 --out figures/ --json analyze.json"


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_target_args(p)
    p.add_argument("--out", metavar="DIR", help="write figures (PNG) to DIR")
    add_json_arg(p)
    add_device_arg(p)
    p.add_argument("--dtype", default="float32", choices=["float32", "float64", "bfloat16"])
    p.add_argument("--seed", type=int, default=0, help="seed of the sampled sequences and of the baselines")
    p.add_argument("--n-seqs", type=int, default=256, help="wind-tunnel sequences for the geometry (default 256)")
    p.add_argument("--features", choices=["residual", "values_concat", "head_outputs"], default=None,
                   help="representation for the value manifold (default: residual stream on wind tunnels, as Paper I's scripts; values_concat on prompts, as Paper III)")
    p.add_argument("--max-snapshots", type=int, default=40, help="replay at most this many weight snapshots (default 40)")
    p.add_argument("--no-dynamics", action="store_true", help="skip the training-dynamics replay")
    p.add_argument("--dynamics-range", choices=["first-stage", "all"], default="first-stage",
                   help="for a checkpoint trained in stages (warm starts): replay the snapshots of the "
                   "first, from-scratch stage (default) or of every stage")


def run(args: argparse.Namespace) -> int:
    if args.n_seqs < 8:
        raise InputError(f"--n-seqs must be at least 8, got {args.n_seqs}")
    model, task, cfg, history, ckpt_dir = load_target(args)
    if not hasattr(model, "blocks") or not hasattr(model, "hooks"):
        raise InputError(f"{args.target!r} holds a {type(model).__name__}, not an attention model; analyze needs a HookedTransformer")
    out = ensure_dir(args.out) if args.out else None
    figs: list[str] = []
    if task is not None and not args.prompts:
        res = windtunnel_suite(model, task, args, history, ckpt_dir, out, figs)
    else:
        res = text_suite(model, args, out, figs)
    res["target"] = str(args.target)
    res["model"] = {"n_layers": model.cfg.n_layers, "n_heads": model.cfg.n_heads, "d_model": model.cfg.d_model, "n_key_value_heads": model.cfg.n_key_value_heads}
    res["figures"] = figs
    rows = [
        {"layer": i, "ko": res["key_orthogonality"][i], "ent": res["attention_entropy"][i]}
        for i in range(len(res["key_orthogonality"]))
    ]
    print(f"analyze {args.target} ({res['mode']})")
    print(format_table(rows, [("layer", "layer", "d"), ("ko", "key orth.", ".3f"), ("ent", "attn entropy", ".3f")]))
    rho = res.get("spearman_pc1_entropy")
    print(
        f"value manifold ({res['manifold_features']}): PC1 {100 * res['value_pc1']:.1f}%, PC1+PC2 {100 * res['value_pc12']:.1f}%, "
        f"PR {res['participation_ratio']:.2f}, Spearman(PC1, entropy) {rho if rho is None else format(rho, '+.3f')}"
    )
    print(f"attention-entropy reduction first→last: {100 * res['attention_entropy_reduction']:.1f}%")
    if "frame_stabilization_step" in res:
        print(
            f"frame stabilises at step {res['frame_stabilization_step']}, precision at {res['precision_stabilization_step']} "
            f"(ratio {res['dissociation_ratio']}); settling (distance to final): frame {res['frame_settling_step']}, "
            f"values {res['precision_settling_step']}, calibration {res['calibration_settling_step']}"
        )
    if figs:
        print(f"figures: {', '.join(figs)}")
    write_json(args.json, json.loads(json.dumps(res, default=_json_safe)))
    return 0


def _json_safe(o: Any) -> Any:
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray | torch.Tensor):
        return o.tolist()
    return str(o)
