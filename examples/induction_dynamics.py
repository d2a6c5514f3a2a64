"""Does the routing law predict where attention goes while induction heads form? (issue 15)

Replays the weight snapshots of a byte-level stdlib model (default: the shipped ``stdlib-attn2``)
on held-out repeated random sequences and held-out stdlib code, and writes the figures and a JSON
summary (see :mod:`bayesmanifold.experiments.induction_dynamics` for every definition).

Run:
    python examples/induction_dynamics.py                              # ~75 s on a CPU
    python examples/induction_dynamics.py --quick                      # 4 sequences, no replay
    python examples/induction_dynamics.py --checkpoint runs/my-run --out out/induction
"""

import argparse

import pandas as pd

from bayesmanifold.experiments.induction_dynamics import induction_dynamics, write_outputs


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", default="stdlib-attn2", help="checkpoint directory or shipped name with snapshots/")
    p.add_argument("--out", default="docs/induction", help="where the figures and induction_dynamics.json go")
    p.add_argument("--n-seqs", type=int, default=16, help="sequences per probe")
    p.add_argument("--no-replay", action="store_true", help="skip the frame-precision replay")
    p.add_argument("--quick", action="store_true", help="4 sequences per probe and no replay (a first look)")
    args = p.parse_args(argv)
    n_seqs, replay = (4, False) if args.quick else (args.n_seqs, not args.no_replay)
    res = induction_dynamics(args.checkpoint, n_seqs=n_seqs, replay_dynamics=replay)
    paths = write_outputs(res, args.out)
    L, H = res.induction_head
    snaps = res.to_dataframe("snapshots")
    final = snaps[snaps.step == res.steps[-1]].pivot_table(index=["layer", "head"], columns="probe", values="score")
    print(f"{res.checkpoint}: {len(res.steps)} snapshots; strongest induction head L{L}H{H}; "
          f"phase change {res.rise_start}..{res.rise_end}")
    print("final induction scores:\n" + final.round(3).to_string())
    with pd.option_context("display.width", 200):
        print(pd.DataFrame(res.phase_summary()).round(4).to_string(index=False))
    dyn = res.dynamics
    if dyn:
        print(f"frame settles at {dyn['frame_settling_step']}, precision at {dyn['precision_settling_step']} "
              f"(stabilisation: frame {dyn['frame_stabilization_step']}, precision {dyn['precision_stabilization_step']})")
    for k, v in paths.items():
        print(f"{k}: {v}")
    return paths


if __name__ == "__main__":
    main()
