"""``bayesmanifold reproduce``: re-run a paper's experiment with its controls.

``bayesmanifold reproduce em-vs-sgd`` runs Paper II's EM-like vs SGD comparison on the sticky
Markov chain (arXiv 2512.22473, section 5.2) with the controls the paper lacks, prints the table,
writes the loss curves and the routing-vs-values dynamics figure to ``--out`` and the numbers to
``--json``.
"""

import argparse
import os
import sys

from .common import (
    add_device_arg,
    add_json_arg,
    at_least,
    output_dir,
    positive_float,
    probability,
    seed,
)

NAME = "reproduce"
HELP = "reproduce a paper experiment with controls (em-vs-sgd: Paper II's sticky-chain EM-like vs SGD)"
EXAMPLE = "bayesmanifold reproduce em-vs-sgd --seeds 5 --steps 1000 --out results/em_vs_sgd --json em_vs_sgd.json"

EXPERIMENTS = ("em-vs-sgd",)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("experiment", choices=EXPERIMENTS, help="which experiment")
    p.add_argument("--seeds", type=at_least(1), default=5, metavar="N", help="first N of the seeds 42 2024 1337 7777 9999 (default 5)")
    p.add_argument("--steps", type=at_least(1), default=1000, metavar="N", help="full-batch steps per run (default 1000)")
    add_device_arg(p)
    p.add_argument("--out", default="em_vs_sgd_out", metavar="DIR", type=output_dir, help="directory for the figures (default em_vs_sgd_out)")
    add_json_arg(p)
    p.add_argument("--deep", action="store_true", help="also train the deep 4×4 TransformerLens variant (slow on CPU)")
    p.add_argument("--deep-steps", type=at_least(1), default=2000, metavar="N", help="steps of the deep variant (default 2000)")
    p.add_argument("--no-controls", action="store_true", help="only SGD and EM-like (no controls)")
    p.add_argument("--no-probes", action="store_true", help="skip the capture probes and the dynamics figure")
    p.add_argument("--lr", type=positive_float, default=0.01, help="SGD learning rate (default 0.01)")
    p.add_argument("--value-lr", type=positive_float, default=0.1, help="EM-like learning rate on W_V (default 0.1)")
    p.add_argument("--stickiness", type=probability, default=0.3, help="stated stickiness s in [0, 1) (default 0.3)")
    p.add_argument("--data-seed", type=seed, default=None, metavar="S",
                   help="one shared sequence from seed S (default: each seed samples its own, as the released script)")
    p.add_argument("--threads", type=at_least(1), default=None, metavar="N", help="CPU threads: torch's, and the EM-vs-SGD training's processes (default: torch's thread count)")
    p.add_argument("--no-progress", action="store_true", help="no progress lines on stderr")


def run(args: argparse.Namespace) -> int:
    import torch

    from ..allocator import keep_freed_memory
    from ..experiments.em_vs_sgd import EMvsSGDConfig, reproduce_em_vs_sgd, seeds_for
    from ..experiments.em_vs_sgd.deep import DeepConfig

    keep_freed_memory()  # this process is ours: keep freed pages (see bayesmanifold/allocator.py)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    config = EMvsSGDConfig(
        seeds=seeds_for(args.seeds),
        steps=args.steps,
        lr=args.lr,
        value_lr=args.value_lr,
        stickiness=args.stickiness,
        data_seed=args.data_seed,
        controls=not args.no_controls,
        probes=not args.no_probes,
        device=args.device,
    )
    deep = None
    if args.deep:
        deep = DeepConfig(steps=args.deep_steps, device=args.device, stickiness=args.stickiness)
    quiet = args.no_progress or os.environ.get("BAYESMANIFOLD_QUIET") == "1"

    def progress(msg: str) -> None:
        if not quiet:
            print(f"[reproduce] {msg}", file=sys.stderr, flush=True)

    res, probes, deep_res, out = reproduce_em_vs_sgd(config, out_dir=args.out, deep=deep, progress=progress)
    print(res.table())
    if probes is not None:
        for m, s in probes.summary.items():
            print(
                f"dynamics ({m}, seed {config.seeds[0]}): attention drift below 10% of peak "
                f"{_from_step(s['attention_stable_step'])}, value drift {_from_step(s['values_stable_step'])}; "
                f"routing first: {s['routing_first']}"
            )
    if deep_res is not None:
        for m in deep.methods:
            s = deep_res.summary()[m]
            print(
                f"deep {m}: test loss {s['test_loss']:.4f}, test entropy {s['test_entropy']:.4f}, "
                f"entropy − H_min {s['test_entropy_minus_h_min']:+.4f} nats"
            )
    print(f"figures in {args.out}; total wall {out['total_wall_s']:.1f} s")
    if args.json:
        from ..io import atomic_write_json

        atomic_write_json(args.json, out)
    return 0


def _from_step(step) -> str:
    return "not reached within the run" if step is None else f"from step {step}"
