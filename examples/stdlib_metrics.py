"""Measure a finished stdlib text checkpoint: held-out loss, every head's induction score at every
snapshot (written to its ``metrics.json``), and the loss-curve figure of several checkpoints.

This is how the shipped ``stdlib-attn2`` and ``stdlib-mlp2`` got their ``metrics.json`` and the
README its loss curves (see :mod:`bayesmanifold.experiments.stdlib_models` for the definitions).

Run:
    python examples/stdlib_metrics.py runs/stdlib-attn2 runs/stdlib-mlp2 --figure docs/induction/stdlib_loss_curves.png
    python examples/stdlib_metrics.py runs/my-run --no-write        # print only
    python examples/stdlib_metrics.py --quick                        # the shipped stdlib-attn2, printed
"""

import argparse
import json

from bayesmanifold.experiments.stdlib_models import (
    checkpoint_metrics,
    plot_loss_curves,
    write_metrics,
)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("checkpoints", nargs="*", default=["stdlib-attn2"],
                   help="finished text checkpoint directories or shipped names (default: stdlib-attn2)")
    p.add_argument("--figure", help="write the loss curves of all of them to this PNG")
    p.add_argument("--no-write", action="store_true", help="print the metrics instead of writing metrics.json")
    p.add_argument("--quick", action="store_true", help="4 probe sequences, print only, figure in the current directory")
    args = p.parse_args(argv)
    kw = {}
    if args.quick:
        args.no_write, args.figure, kw = True, args.figure or "loss_curves.png", {"n_seqs": 4}
    out = {}
    for ck in args.checkpoints:
        m = checkpoint_metrics(ck, **kw) if args.no_write else write_metrics(ck, **kw)
        best = max(m["heads"], key=lambda h: h["induction_score"])
        prev = max(m["heads"], key=lambda h: h["prev_token_score"])
        print(f"{ck}: held-out {m['heldout_loss']:.4f} nats/token"
              + (f" ({m['heldout_loss_per_byte']:.4f} nats/byte)" if "heldout_loss_per_byte" in m else "")
              + f"; strongest induction head {best['layer']}.{best['head']} score {best['induction_score']:.3f} "
              f"(max {best['max_over_snapshots']:.3f}, rose at step {best['rise_step']}); "
              f"strongest previous-token head {prev['layer']}.{prev['head']} {prev['prev_token_score']:.3f}")
        print(json.dumps([{k: h[k] for k in ("layer", "head", "induction_score", "rise_step")} for h in m["heads"]]))
        out[ck] = m
    if args.figure:
        print(f"figure: {plot_loss_curves(args.checkpoints, args.figure)}")
    return out


if __name__ == "__main__":
    main()
