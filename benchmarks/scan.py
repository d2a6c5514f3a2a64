"""Cost of a corpus scan against the floor, its memory in the number of tokens, and 2 vs 1 process.

On a randomly initialised HookedTransformer (default: 4 layers, d_model 256, 8 heads, vocabulary
8192; ``--layers``/``--d-model``/``--heads``/``--vocab``) and a corpus of random token ids in a
``.npy`` file, measured in one run:

- **speed**: ``bayesmanifold.corpus.scan`` with the default measures (routing law, advantage
  statistics, attention entropy, value-update norms) over ``--batches`` batches of
  ``--batch`` × ``--seq`` tokens, against the **floor** on the same batches: one forward pass plus
  one backward pass to the embedding output with the weights frozen (no weight gradients), which
  is what capture itself cannot avoid (as ``benchmarks/overhead.py``'s floor mode). Printed:
  scan tokens/s ÷ floor tokens/s (target ≥ 0.9; the fastest of ``--reps`` interleaved repeats of
  each, and the ratio of the medians); the scan's time includes reading the corpus,
  fingerprinting the model and data, and finalizing (no files are written).
- **memory**: peak memory of a scan of 4× the tokens ÷ that of 1× (target ≤ 1.02), each in its
  own process after a warm-up scan of 1× (so both are measured in the allocator's steady state).
  On CPU: the peak resident set size of the measured scan (the kernel's high-water mark, reset
  after the warm-up through ``/proc/self/clear_refs``); the resident size just before it is kept
  in the JSON but not compared, since how much the allocator hands back after the warm-up varies
  from process to process by hundreds of MiB. On CUDA: ``torch.cuda.max_memory_allocated``.
- **processes**: wall time of the same scan in 1 process and under
  ``torchrun --standalone --nproc-per-node 2``, each process with ``--threads`` threads (default
  1: on a CPU machine shared with other work, more threads per process mostly wait on each
  other), both the scan's own time and the whole command's (with interpreter start-up).

Usage::

    python benchmarks/scan.py [--batches 8] [--batch 4] [--seq 256] [--reps 2] [--device cpu] [--json PATH]
"""

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from process_memory import peak_rss, reset_peak_rss, rss_now


def _build(args):
    from bayesmanifold.backends import build_model

    # a HookedTransformer on TransformerLens 2.18/3.x, a native TransformerBridge of the same shape on 4.x
    cfg = dict(
        n_layers=args.layers, d_model=args.d_model, n_heads=args.heads, d_head=args.d_model // args.heads,
        d_mlp=4 * args.d_model, n_ctx=args.seq, d_vocab=args.vocab, act_fn="gelu_new", normalization_type="LN",
    )
    return build_model(cfg, seed=0, device=args.device, dtype="float32").eval()


def _config(args, corpus: str, factor: int = 1):
    from bayesmanifold.corpus import ScanConfig

    return ScanConfig(data=corpus, seq_len=args.seq, batch_size=args.batch,
                      max_tokens=factor * args.batches * args.batch * args.seq, progress=False)


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()




def _floor_pass(model, tokens):
    import torch

    leaf = {}

    def start(t, hook):
        leaf["x"] = t.detach().requires_grad_(True)
        return leaf["x"]

    with model.hooks(fwd_hooks=[("hook_embed", start)]):
        loss = model(tokens, return_type="loss")
    torch.autograd.grad(loss, [leaf["x"]])


def worker_speed(args, corpus: str) -> dict:
    """Floor and scan on the same batches, interleaved ``--reps`` times after a warm-up."""
    import numpy as np
    import torch

    from bayesmanifold.corpus import scan

    model = _build(args)
    for p in model.parameters():
        p.requires_grad_(False)  # the floor has no weight gradients; capture never asks for them
    ids = np.load(corpus, mmap_mode="r")
    n = args.batches * args.batch * args.seq
    batches = torch.from_numpy(np.asarray(ids[:n], dtype=np.int64)).view(args.batches, args.batch, args.seq)
    batches = batches.to(args.device)
    cfg = _config(args, corpus)
    _floor_pass(model, batches[0])
    scan(model, dataclasses.replace(cfg, max_tokens=args.batch * args.seq))  # warm-up
    floor_t, scan_t = [], []
    for _ in range(args.reps):
        _sync(args.device)
        t0 = time.perf_counter()
        for b in batches:
            _floor_pass(model, b)
        _sync(args.device)
        floor_t.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        res = scan(model, cfg)
        _sync(args.device)
        scan_t.append(time.perf_counter() - t0)
    return {"floor_s": floor_t, "scan_s": scan_t, "tokens": n, "scan_tokens": res.n_tokens}






def worker_memory(args, corpus: str, factor: int) -> dict:
    """Peak memory of a scan of ``factor`` × the tokens, after a warm-up scan of 1× in the same
    process: both sizes are measured with the allocator and the lazily imported modules in the same
    steady state, so the ratio shows what grows with the tokens, not start-up effects."""
    import torch

    from bayesmanifold.corpus import scan

    model = _build(args)
    scan(model, _config(args, corpus, 1))  # warm-up
    cfg = _config(args, corpus, factor)
    cuda = args.device.startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        reset = reset_peak_rss()
        base = rss_now()
    res = scan(model, cfg)
    peak = torch.cuda.max_memory_allocated() if cuda else peak_rss()
    return {"peak": peak, "base": base, "tokens": res.n_tokens, "peak_reset": True if cuda else reset}


def worker_wall(args, corpus: str) -> dict:
    from bayesmanifold.corpus import scan

    model = _build(args)
    res = scan(model, _config(args, corpus))
    return {"scan_s": res.summary["elapsed_s"], "world_size": res.summary["world_size"], "tokens": res.n_tokens,
            "rank": int(os.environ.get("RANK", "0"))}


def _run(cmd: list[str], threads: int) -> tuple[dict, float]:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    t0 = time.perf_counter()
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout
    wall = time.perf_counter() - t0
    lines = [json.loads(x) for x in out.splitlines() if x.startswith("{")]
    return next(x for x in lines if x.get("rank", 0) == 0), wall


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--d-model", type=int, default=256)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--batches", type=int, default=8)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1, help="threads per process (default 1)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--json", metavar="PATH")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--corpus", help=argparse.SUPPRESS)
    ap.add_argument("--factor", type=int, default=1, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        import torch

        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", args.threads)))
        fn = {"speed": lambda: worker_speed(args, args.corpus), "memory": lambda: worker_memory(args, args.corpus, args.factor),
              "wall": lambda: worker_wall(args, args.corpus)}[args.worker]
        print(json.dumps(fn()), flush=True)
        return 0

    import numpy as np

    shape = ["--layers", str(args.layers), "--d-model", str(args.d_model), "--heads", str(args.heads), "--vocab",
             str(args.vocab), "--seq", str(args.seq), "--batch", str(args.batch), "--batches", str(args.batches),
             "--reps", str(args.reps), "--device", args.device]
    with tempfile.TemporaryDirectory() as tmp:
        corpus = str(Path(tmp) / "tokens.npy")
        n = 4 * args.batches * args.batch * args.seq
        np.save(corpus, np.random.default_rng(0).integers(0, args.vocab, n, dtype=np.int32))
        me = [sys.executable, __file__, *shape, "--corpus", corpus]
        speed, _ = _run(me + ["--worker", "speed"], args.threads)
        mem = {f: _run(me + ["--worker", "memory", "--factor", str(f)], args.threads)[0] for f in (1, 4)}
        one, one_wall = _run(me + ["--worker", "wall"], args.threads)
        two, two_wall = _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                              __file__, *shape, "--corpus", corpus, "--worker", "wall"], args.threads)
    # the fastest repeat is the least disturbed by other work on a shared machine; medians are kept too
    floor_s, scan_s = min(speed["floor_s"]), min(speed["scan_s"])
    m1, m4 = mem[1], mem[4]
    res = {
        "model": {"n_layers": args.layers, "d_model": args.d_model, "n_heads": args.heads, "d_vocab": args.vocab},
        "batch": args.batch, "seq": args.seq, "batches": args.batches, "reps": args.reps, "device": args.device,
        "threads": args.threads,
        "floor_tokens_per_s": speed["tokens"] / floor_s,
        "scan_tokens_per_s": speed["tokens"] / scan_s,
        "scan_over_floor_throughput": floor_s / scan_s,
        "scan_over_floor_throughput_median": statistics.median(speed["floor_s"]) / statistics.median(speed["scan_s"]),
        "peak_memory_4x_over_1x": m4["peak"] / m1["peak"],
        "peak_memory_1x_bytes": m1["peak"],
        "one_process_scan_s": one["scan_s"], "two_process_scan_s": two["scan_s"],
        "two_over_one_scan_time": two["scan_s"] / one["scan_s"],
        "one_process_command_s": one_wall, "two_process_command_s": two_wall,
        "two_over_one_command_time": two_wall / one_wall,
        "raw": {"speed": speed, "memory": mem, "one": one, "two": two},
    }
    print(f"model {args.layers} layers × {args.heads} heads, d_model {args.d_model}, vocab {args.vocab}; "
          f"{args.batches} batches of {args.batch}×{args.seq} tokens on {args.device}, {args.threads} thread(s) per process")
    print(f"scan {res['scan_tokens_per_s']:.0f} tok/s, floor {res['floor_tokens_per_s']:.0f} tok/s: "
          f"scan/floor throughput {res['scan_over_floor_throughput']:.3f} (target ≥ 0.9; ratio of medians "
          f"{res['scan_over_floor_throughput_median']:.3f})")
    print(f"peak memory 4× tokens / 1×: {res['peak_memory_4x_over_1x']:.3f} (target ≤ 1.02; "
          f"{m1['peak'] / 2**20:.0f} MiB at 1×)")
    print(f"2 processes vs 1: scan {two['scan_s']:.2f} s vs "
          f"{one['scan_s']:.2f} s (×{res['two_over_one_scan_time']:.2f}); whole command {two_wall:.1f} s vs "
          f"{one_wall:.1f} s (×{res['two_over_one_command_time']:.2f})")
    if args.json:
        from bayesmanifold.io import atomic_write_json

        atomic_write_json(args.json, res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
