"""Overhead of capture + streamed routing statistics against a plain forward+backward.

On a GPT-2-small-shaped HookedTransformer with random weights (12 layers, d_model 768, 12 heads,
vocabulary 50257), at (batch 4, seq 256) and (batch 1, seq 1024), and on a long-context model
(4 layers, d_model 256, 4 heads, n_ctx 4096) at (batch 1, seq 4096), each measurement in its own
process, four ways:

- ``floor``: what capture cannot avoid: one forward pass plus one backward pass to the embedding
  output with the weights frozen (no weight gradients), nothing else;
- ``plain``: ``model(tokens, return_type="loss").backward()``;
- ``capture``: bayesmanifold's capture with :class:`RoutingLawCheck` and :class:`AdvantageStats`
  streamed (every head of every layer);
- ``naive``: what a user would do with TransformerLens alone: ``run_with_cache(incl_bwd=True)``
  on the four attention hooks, then the same statistics per layer from the cache.

Printed: median wall time over the repeats (after ``--warmup`` untimed passes) and peak memory, as ratios against
``floor`` and ``plain`` measured in the same run. Peak memory on CPU is the process's peak resident set size
(``ru_maxrss``); ``excess`` ratios compare the growth above the resident size just before the
first pass (model and inputs already built), which isolates the pass's own allocations. On CUDA
it is ``torch.cuda.max_memory_allocated``.

Usage::

    python benchmarks/overhead.py [--reps 3] [--warmup 3] [--rounds 1] [--paired 8] [--sizes 4x256,1x1024,1x4096] [--device cpu] [--json PATH]

``--rounds R`` runs every mode's process R times, in turn, and reports the median of each ratio
over the rounds (with the range of the time ratio): on a shared machine one floor process can
be 15 % slower than the next. ``--paired N`` (8 by default; 0: none) also times N floor and
capture passes alternated in one process (``paired_floor_time_ratio``: the median of the N pair ratios, with their range),
which a drift of the machine's speed over minutes cannot bias; memory is only measured in the
separate processes.

Why three warm-up passes: in a fresh process the first passes spend much of their time in page
faults (every N²-sized tensor is a fresh mapping until the C allocator's thresholds settle). On
the 2-core machine at 1 x 1024, the first three floor passes in one process took 2.13, 1.48 and
1.02 million minor faults and 10.0, 7.2 and 6.7 s; after two capture passes more, floor passes took
0.79-0.91 million and 6.0-6.5 s. With one warm-up the timed passes were still partly cold.

A size with ``seq`` > 1024 uses the long-context model. ``--skip-naive`` leaves out the
TransformerLens-alone mode (at 1 x 4096 it holds every layer's four N x N tensors and their gradients).
"""

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

from process_memory import rss_now


def _build(device: str, seq: int):
    from bayesmanifold.backends import build_model

    if seq <= 1024:
        shape = dict(n_layers=12, d_model=768, n_heads=12, d_head=64, d_mlp=3072, n_ctx=1024)
    else:
        shape = dict(n_layers=4, d_model=256, n_heads=4, d_head=64, d_mlp=1024, n_ctx=seq)
    # a HookedTransformer on TransformerLens 2.18/3.x, a native TransformerBridge of the same shape on 4.x
    return build_model(dict(**shape, d_vocab=50257, act_fn="gelu_new", normalization_type="LN"), seed=0,
                       device=device, dtype="float32")


def _hooked_available() -> bool:
    """The naive mode caches TransformerLens's own hook points of a HookedTransformer (2.18/3.x). On
    TransformerLens 4 the native bridge fires ``hook_attn_scores`` after the softmax, so its cache
    holds no scores to compare: the mode is left out there (the README says so)."""
    from bayesmanifold.backends.hooked import HookedBackend

    return HookedBackend.available()


def _stats():
    from bayesmanifold.analyses import AdvantageStats, RoutingLawCheck

    return [RoutingLawCheck(), AdvantageStats()]


def _naive_step(model, tokens):
    """TransformerLens alone: cache everything, then the same statistics per layer."""
    import torch

    from bayesmanifold.hooks import LayerBundle

    names = lambda n: n.endswith(("hook_attn_scores", "hook_pattern", "hook_v", "hook_z"))  # noqa: E731
    model.zero_grad(set_to_none=True)
    _, cache = model.run_with_cache(tokens, names_filter=names, incl_bwd=True, return_type="loss")
    accs = _stats()
    n_heads = model.cfg.n_heads
    for layer in range(model.cfg.n_layers):
        p = f"blocks.{layer}.attn."
        valid = torch.isfinite(cache[p + "hook_attn_scores"][:, 0])
        b = LayerBundle(
            layer=layer, heads=list(range(n_heads)), kv_heads=list(range(n_heads)), attn_scale=None,
            pattern=cache[p + "hook_pattern"], values=cache[p + "hook_v"], grad_z=cache[p + "hook_z_grad"],
            grad_pattern=cache[p + "hook_pattern_grad"], grad_scores=cache[p + "hook_attn_scores_grad"],
            grad_values=cache[p + "hook_v_grad"], valid=valid, query_valid=valid.any(-1),
            n_heads=n_heads, n_kv_heads=n_heads,
        )
        for acc in accs:
            acc.update(b)
    del cache
    return [acc.finalize() for acc in accs]


def _worker(mode: str, batch: int, seq: int, reps: int, device: str, warmup: int = 3) -> dict:
    import torch

    from bayesmanifold.hooks import capture
    from bayesmanifold.hooks.grad_scope import weights_frozen

    model = _build(device, seq)
    tokens = torch.randint(0, 50257, (batch, seq), generator=torch.Generator().manual_seed(0)).to(device)

    def floor():
        leaf = {}

        def start(t, hook):
            leaf["x"] = t.detach().requires_grad_(True)
            return leaf["x"]

        with weights_frozen(model):  # no weight gradients, nor the activations they would need
            with model.hooks(fwd_hooks=[("hook_embed", start)]):
                loss = model(tokens, return_type="loss")
            torch.autograd.grad(loss, [leaf["x"]])

    def plain():
        model.zero_grad(set_to_none=True)
        model(tokens, return_type="loss").backward()

    def ours():
        accs = _stats()
        with capture(model, accumulators=accs) as cap:
            cap.run(tokens)
        return [acc.finalize() for acc in accs]

    if mode == "paired":
        return _paired(floor, ours, reps, device, warmup)
    step = {"floor": floor, "plain": plain, "capture": ours, "naive": lambda: _naive_step(model, tokens)}[mode]
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = rss_now()
    times = [_timed(step, device) for _ in range(warmup + reps)][warmup:]
    if device == "cuda":
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"time": statistics.median(times), "peak": peak, "base": base}


def _timed(fn, device: str) -> float:
    """Wall time of one call (CUDA work included)."""
    import torch

    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def _paired(floor, ours, reps: int, device: str, warmup: int) -> dict:
    """Floor and capture passes alternated in one process (after ``warmup`` of each): the ratio
    of each adjacent pair, so that a drift of the machine's speed falls on both sides of it."""
    for _ in range(warmup):
        _timed(floor, device)
        _timed(ours, device)
    pairs = []
    for i in range(reps):
        # alternate which side goes first, so that neither always follows the other
        first, second = (floor, ours) if i % 2 == 0 else (ours, floor)
        a, b = _timed(first, device), _timed(second, device)
        pairs.append((a, b) if i % 2 == 0 else (b, a))
    return {"pairs": pairs}




def _measure(mode: str, batch: int, seq: int, reps: int, device: str, warmup: int) -> dict:
    cmd = [sys.executable, __file__, "--worker", mode, "--sizes", f"{batch}x{seq}", "--reps", str(reps), "--device", device,
           "--warmup", str(warmup)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def _row(batch: int, seq: int, m: dict) -> dict:
    """The ratios of one round: capture against the floor and against plain fwd+bwd (and naive)."""
    p, f, c = m["plain"], m["floor"], m["capture"]
    row = {
        "batch": batch,
        "seq": seq,
        "floor_time_s": f["time"],
        "floor_excess_bytes": float(f["peak"] - f["base"]),
        "floor_time_ratio": c["time"] / f["time"],
        "floor_excess_memory_ratio": (c["peak"] - c["base"]) / (f["peak"] - f["base"]),
        "plain_time_s": p["time"],
        "time_ratio": c["time"] / p["time"],
        "peak_memory_ratio": c["peak"] / p["peak"],
        "excess_memory_ratio": (c["peak"] - c["base"]) / (p["peak"] - p["base"]),
        "plain_peak_bytes": float(p["peak"]),
    }
    if "naive" in m:
        n = m["naive"]
        row.update(
            naive_time_ratio=n["time"] / p["time"],
            naive_peak_memory_ratio=n["peak"] / p["peak"],
            naive_excess_memory_ratio=(n["peak"] - n["base"]) / (p["peak"] - p["base"]),
            naive_floor_time_ratio=n["time"] / f["time"],
            naive_floor_excess_memory_ratio=(n["peak"] - n["base"]) / (f["peak"] - f["base"]),
        )
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=3,
                    help="untimed passes first in every process (the C allocator's page faults settle over the first few)")
    ap.add_argument("--rounds", type=int, default=1, help="run every mode's process this many times, in turn; report medians")
    ap.add_argument("--sizes", default="4x256,1x1024,1x4096", help="comma-separated BATCHxSEQ")
    ap.add_argument("--skip-naive", action="store_true", help="leave out the TransformerLens-alone mode")
    ap.add_argument("--paired", type=int, default=8, metavar="N",
                    help="also time N floor/capture pairs alternated in one process (default 8; 0: none)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--json", metavar="PATH")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    sizes = [tuple(int(x) for x in s.split("x")) for s in args.sizes.split(",")]
    if args.worker:
        (batch, seq), = sizes
        print(json.dumps(_worker(args.worker, batch, seq, args.reps, args.device, args.warmup)))
        return 0
    results = []
    for batch, seq in sizes:
        modes = ("floor", "plain", "capture") + (() if args.skip_naive or not _hooked_available() else ("naive",))
        # each round runs every mode once, in turn, each in its own process: drift of the machine
        # (other load, frequency) then falls on every mode alike, and the median over rounds of
        # each ratio is reported with its range
        rounds = [_row(batch, seq, {mode: _measure(mode, batch, seq, args.reps, args.device, args.warmup) for mode in modes})
                  for _ in range(args.rounds)]
        row = {k: (statistics.median(r[k] for r in rounds) if isinstance(v, float) else v) for k, v in rounds[0].items()}
        if args.rounds > 1:
            row["rounds"] = rounds
        if args.paired:
            pairs = _measure("paired", batch, seq, args.paired, args.device, args.warmup)["pairs"]
            ratios = [c / f for f, c in pairs]
            row.update(paired_floor_time_ratio=statistics.median(ratios), paired_ratio_min=min(ratios),
                       paired_ratio_max=max(ratios), paired_seconds=pairs)
        results.append(row)
        naive = (
            f" | naive TL ×{row['naive_floor_time_ratio']:.3f} time, ×{row['naive_floor_excess_memory_ratio']:.3f} excess"
            if "naive_floor_time_ratio" in row
            else ""
        )
        spread = ""
        if args.rounds > 1:
            tr = [r["floor_time_ratio"] for r in rounds]
            spread = f" (median of {args.rounds} rounds; time ratio from ×{min(tr):.3f} to ×{max(tr):.3f})"
        print(
            f"batch {batch:>2} seq {seq:>5}: floor {row['floor_time_s']:.2f} s, excess {row['floor_excess_bytes'] / 2**30:.2f} GiB | "
            f"capture+stats vs floor: time ×{row['floor_time_ratio']:.3f}, excess memory "
            f"×{row['floor_excess_memory_ratio']:.3f} | vs plain fwd+bwd ({row['plain_time_s']:.2f} s): time "
            f"×{row['time_ratio']:.3f}, peak ×{row['peak_memory_ratio']:.3f}{naive}{spread}",
            flush=True,
        )
        if args.paired:
            print(f"                   paired in one process: capture+stats vs floor ×{row['paired_floor_time_ratio']:.3f} "
                  f"(median of {args.paired} pairs, from ×{row['paired_ratio_min']:.3f} to ×{row['paired_ratio_max']:.3f})",
                  flush=True)
    if args.json:
        from bayesmanifold.io import atomic_write_json

        atomic_write_json(args.json, {"device": args.device, "reps": args.reps, "warmup": args.warmup, "rounds": args.rounds, "sizes": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
