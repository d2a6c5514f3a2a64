"""The corpus scan: every per-head measurement streamed over a corpus, resumable, multi-process.

Data path: the corpus is read into one token stream and packed into windows (:mod:`.data`); the
batches of this process's shard run through one :func:`~bayesmanifold.hooks.capture` each, which
hands every layer's bundle to the measures' accumulators (:mod:`.measures`); every
``checkpoint_every`` batches the accumulators' states, the position reached and the run's
identity are written atomically (:mod:`.state`); at the end the processes' states are gathered
and merged in rank order (:mod:`.distributed`), finalized, and rank 0 writes the outputs
(:mod:`.output`).

Which batches a process measures: the ``n_batches`` batches are cut into ``shard[1]`` contiguous
blocks (``shard[0]`` is measured), and that block into ``world_size`` contiguous blocks, one per
rank. A batch is always the same windows, whatever the number of processes, so a W-process scan
computes exactly the per-batch quantities of a 1-process scan and differs only in the order of
float64 sums (maxima, minima and counts are identical).
"""

import contextlib
import hashlib
import math
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from ..backends import model_access
from ..backends.batch import Batch
from ..errors import CheckpointError, ConfigError, InputError
from ..hooks.capture import capture
from .config import IDENTITY_FIELDS, ScanConfig
from .data import read_corpus, split_range
from .distributed import ProcessInfo, barrier, gather, process_group
from .measures import MEASURES, ModelShape, position_groups
from .result import ScanResult, build_result
from .state import encode_state, load_checkpoint, restore_state, save_checkpoint

__all__ = ["scan", "model_fingerprint", "run_identity", "fresh_accumulators", "check_out_dir", "FINAL_STATE"]

FINAL_STATE = "state.pt"
_RANK_DIR = "checkpoints"


def check_out_dir(out: str | Path | None, *, resume: bool, overwrite: bool) -> None:
    """Refuse, before any work, an output directory that holds an earlier run, unless ``resume``
    continues it or ``overwrite`` discards it: a finished scan is never replaced and an
    interrupted run's checkpoints are never deleted without being asked to."""
    if out is None or resume or overwrite:
        return
    d = Path(out)
    ckpts = sorted(p.name for p in (d / _RANK_DIR).glob("rank*-of-*.pt")) if (d / _RANK_DIR).is_dir() else []
    if ckpts:
        raise CheckpointError(
            f"{str(d)!r} holds an interrupted scan ({_RANK_DIR}/{ckpts[0]}): continue it with --resume (resume=True), "
            "or pass --overwrite (overwrite=True) to discard it and start again"
        )
    if (d / FINAL_STATE).is_file():
        raise CheckpointError(
            f"{str(d)!r} holds a finished scan ({FINAL_STATE}): give another output directory, or pass --overwrite "
            "(overwrite=True) to replace it"
        )


def model_fingerprint(model: torch.nn.Module) -> str:
    """SHA-256 over every parameter's name, shape, dtype, first 64 values and float64 sum and
    sum of squares (rounded to 10 significant digits, so the device does not matter)."""
    h = hashlib.sha256()
    with torch.no_grad():
        for name, p in model.named_parameters():
            flat = p.detach().reshape(-1)
            head = flat[:64].to("cpu", torch.float64).tolist()
            s, sq = float(flat.double().sum()), float(flat.double().square().sum())
            h.update(f"{name}|{tuple(p.shape)}|{p.dtype}|{[f'{x:.10g}' for x in head]}|{s:.10g}|{sq:.10g};".encode())
    return h.hexdigest()


def run_identity(config: ScanConfig, shape: ModelShape, model_fp: str, data_fp: str, tokenization: str) -> dict[str, Any]:
    """What a resumed run or a merged part must share with the original: model, data, configuration."""
    cfg = config.to_dict()
    return {
        "model_fingerprint": model_fp,
        "model_shape": shape.to_dict(),
        "data_fingerprint": data_fp,
        "tokenization": tokenization,
        "config": {k: cfg[k] for k in IDENTITY_FIELDS if k != "layers"} | {"layers": list(shape.layers)},
    }


def identity_mismatch(saved: dict[str, Any], now: dict[str, Any]) -> str:
    """Empty when the identities agree, else what differs."""
    diffs = []
    for key, what in (("model_fingerprint", "the model (weights or dtype)"), ("data_fingerprint", "the data"),
                      ("tokenization", "the tokenization"), ("model_shape", "the model's shape")):
        if saved.get(key) != now.get(key):
            diffs.append(what)
    sc, nc = saved.get("config", {}), now.get("config", {})
    for k in sorted(set(sc) | set(nc)):
        if sc.get(k) != nc.get(k):
            diffs.append(f"{k} ({sc.get(k)!r} then, {nc.get(k)!r} now)")
    return ", ".join(diffs)


def fresh_accumulators(measures: tuple[str, ...], shape: ModelShape) -> dict[str, Any]:
    return {name: MEASURES[name].make(shape) for name in measures}


def merge_states(states: list[dict[str, Any]], measures: tuple[str, ...], shape: ModelShape) -> dict[str, Any]:
    """Accumulators holding the merge of encoded states, in the order given."""
    accs = fresh_accumulators(measures, shape)
    for name, acc in accs.items():
        restore_state(acc, states[0][name])
        for st in states[1:]:
            acc.merge(restore_state(MEASURES[name].make(shape), st[name]))
    return accs


# ------------------------------------------------------------------------------------ signals
@contextlib.contextmanager
def _stop_requests() -> Iterator[list[bool]]:
    """A flag set by SIGINT/SIGTERM, so the scan stops after the current batch with a checkpoint;
    a second signal interrupts at once. Handlers are restored on exit (main thread only)."""
    flag = [False]
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return
    old = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}

    def handler(signum: int, frame: Any) -> None:
        if flag[0]:
            raise KeyboardInterrupt
        flag[0] = True

    for s in old:
        signal.signal(s, handler)
    try:
        yield flag
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def _progress(total: int, initial: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, unit="tok", unit_scale=True, disable=not enabled,
                dynamic_ncols=True, desc="scan")


# ------------------------------------------------------------------------------------ the scan
def scan(model: torch.nn.Module, config: ScanConfig, *, on_batch: Callable[[int], None] | None = None,
         model_name: str | None = None) -> ScanResult:
    """Stream every selected measurement over a corpus and return per-head statistics.

    Args:
        model: a TransformerLens model (its tokenizer reads text; without one, a vocabulary of
            at least 256 ids reads UTF-8 bytes).
        config: a :class:`ScanConfig`.
        on_batch: called with each finished batch's global index (after its checkpoint).
        model_name: recorded in the summary.

    Returns:
        A :class:`ScanResult` (the merged result of every process; rank 0 has written it to
        ``config.out``).

    Raises:
        BayesManifoldError: before any pass, for a bad corpus, a ``seq_len`` above n_ctx, more
            processes than sequences, or a resume directory from another run.

    Example:
        >>> res = scan(model, ScanConfig(data="corpus/", seq_len=64, out="scan/"))  # doctest: +SKIP
        >>> res.to_dataframe()[["layer", "head", "mass_positive"]]  # doctest: +SKIP
    """
    if not isinstance(config, ScanConfig):
        raise ConfigError(f"config must be a ScanConfig, got {type(config).__name__}")
    check_out_dir(config.out, resume=config.resume, overwrite=config.overwrite)
    access = model_access(model)
    n_ctx = access.n_ctx
    if n_ctx is not None and config.seq_len > n_ctx:
        raise InputError(f"--seq-len {config.seq_len} exceeds the model's context n_ctx={n_ctx}")
    layers = tuple(access.norm_layers(None if config.layers is None else list(config.layers)))
    shape = ModelShape(access.n_layers, access.n_heads, access.n_kv_heads, access.d_head, layers)
    with process_group() as info:
        return _scan(model, access, config, shape, info, on_batch, model_name)


def _scan(model, access, config: ScanConfig, shape: ModelShape, info: ProcessInfo, on_batch, model_name) -> ScanResult:
    stream = read_corpus(config.data, access, seq_len=config.seq_len, fmt=config.format, max_tokens=config.max_tokens)
    B, n_seq = config.batch_size, stream.n_sequences
    n_batches = math.ceil(n_seq / B)
    part = split_range(0, n_batches, config.shard[1], config.shard[0])
    part_seqs = min(part[1] * B, n_seq) - part[0] * B
    if part[0] >= part[1]:
        raise InputError(f"shard {config.shard[0]}/{config.shard[1]} is empty: the corpus gives only {n_batches} batches")
    if info.world_size > part_seqs:
        raise InputError(f"{info.world_size} processes but only {part_seqs} sequences to measure; use at most {part_seqs} processes")
    mine = split_range(part[0], part[1], info.world_size, info.rank)
    identity = run_identity(config, shape, model_fingerprint(model), stream.fingerprint, stream.tokenization)
    part_info = {"batches": list(part), "sequences": [part[0] * B, min(part[1] * B, n_seq)],
                 "shard": list(config.shard), "n_batches_total": n_batches, "n_sequences_total": n_seq}
    out = Path(config.out) if config.out else None
    rank_ckpt = out / _RANK_DIR / f"rank{info.rank}-of-{info.world_size}.pt" if out else None
    accs = fresh_accumulators(config.measures, shape)
    start, n_tok_done = mine[0], 0
    t0 = time.perf_counter()
    if config.resume:
        final = _load_matching(out / FINAL_STATE, identity, require=False)
        if final is not None and final["complete"] and final["part"]["batches"] == list(part):
            # already finished: every process rebuilds the merged result, nothing is measured again
            accs = merge_states([final["accumulators"]], config.measures, shape)
            return _finish(accs, final["n_tokens"], final["n_sequences"], identity, part_info, stream, config, shape,
                           info, model_name, t0, write_state=False, saved=final["extra"].get("summary", {}))
        ck = _load_matching(rank_ckpt, identity, require=True)
        if ck["part"] != {**part_info, "rank": list(mine), "world_size": info.world_size}:
            raise CheckpointError(
                f"{rank_ckpt} covers batches {ck['part'].get('rank')} of shard {ck['part'].get('shard')} with "
                f"{ck['part'].get('world_size')} processes; this run has batches {list(mine)} of shard {list(config.shard)} "
                f"with {info.world_size}: resume with the same shard and number of processes"
            )
        accs = merge_states([ck["accumulators"]], config.measures, shape)
        start, n_tok_done = ck["next_batch"], ck["n_tokens"]
    elif out is not None:
        rank_ckpt.unlink(missing_ok=True)
        if info.is_writer:
            (out / FINAL_STATE).unlink(missing_ok=True)
    my_part = {**part_info, "rank": list(mine), "world_size": info.world_size}
    total_tok = (min(mine[1] * B, n_seq) - mine[0] * B) * config.seq_len

    def checkpoint(next_batch: int, complete: bool) -> None:
        if rank_ckpt is not None:
            save_checkpoint(rank_ckpt, identity=identity, part=my_part, next_batch=next_batch, n_tokens=n_tok,
                            n_sequences=n_tok // config.seq_len, accumulators=accs, complete=complete)

    n_tok = n_tok_done
    show = info.is_writer and (config.progress if config.progress is not None else sys.stderr.isatty())
    needs_labels = any(MEASURES[m].labels for m in config.measures)
    device = access.device
    bar = _progress(total_tok, n_tok_done, show)
    try:
        with _stop_requests() as stop, capture(model, accumulators=list(accs.values()), layers=list(shape.layers)) as cap:
            for k in range(start, mine[1]):
                lo, hi = k * B, min((k + 1) * B, n_seq)
                tokens = stream.window(lo, hi)
                labels = {"group": position_groups(hi - lo, config.seq_len)} if needs_labels else {}
                cap.run(Batch(tokens=tokens.to(device), labels=labels))
                n_tok += tokens.numel()
                bar.update(tokens.numel())
                done = k + 1 - start
                if config.checkpoint_every and done % config.checkpoint_every == 0 and k + 1 < mine[1]:
                    checkpoint(k + 1, False)
                if stop[0]:
                    checkpoint(k + 1, False)
                    raise KeyboardInterrupt
                if on_batch is not None:
                    on_batch(k)
    finally:
        bar.close()
    checkpoint(mine[1], True)
    return _finish(accs, n_tok, n_tok // config.seq_len, identity, part_info, stream, config, shape, info,
                   model_name, t0, write_state=True, rank_ckpt=rank_ckpt, session_tokens=n_tok - n_tok_done)


def _load_matching(path: Path, identity: dict, *, require: bool) -> dict | None:
    if not path.is_file():
        if require:
            raise CheckpointError(f"nothing to resume: no scan checkpoint at {str(path)!r}; run without --resume to start")
        return None
    ck = load_checkpoint(path)
    diff = identity_mismatch(ck["identity"], identity)
    if diff:
        raise CheckpointError(f"{str(path)!r} is from another run: it differs in {diff}; use another output directory or rerun without --resume")
    return ck


def _finish(accs, n_tok, n_seqs, identity, part_info, stream, config, shape, info, model_name, t0, *, write_state,
            rank_ckpt=None, session_tokens=0, saved=None) -> ScanResult:
    """Gather and merge every process's state, finalize, and (rank 0) write the outputs."""
    if write_state:  # each process holds its own part: gather and merge in rank order
        states = gather({"accumulators": {n: encode_state(a) for n, a in accs.items()}, "n_tokens": n_tok,
                         "n_sequences": n_seqs, "session_tokens": session_tokens}, info)
        if info.world_size > 1:
            accs = merge_states([s["accumulators"] for s in states], config.measures, shape)
        n_tok = sum(s["n_tokens"] for s in states)
        n_seqs = sum(s["n_sequences"] for s in states)
        session_tokens = sum(s["session_tokens"] for s in states)
    elapsed = time.perf_counter() - t0
    summary = scan_summary(identity, part_info, stream.describe(), config, n_tok, n_seqs, info.world_size, model_name,
                           elapsed=elapsed, tokens_per_s=session_tokens / elapsed if session_tokens else float("nan"))
    if saved:  # a finished run rebuilt from its state: report how it ran
        summary.update({k: saved[k] for k in ("world_size", "elapsed_s", "tokens_per_s") if k in saved})
    result = build_result(accs, summary)
    if config.out and info.is_writer:
        from .output import write_outputs

        if write_state:
            save_checkpoint(Path(config.out) / FINAL_STATE, identity=identity, part=part_info,
                            next_batch=part_info["batches"][1], n_tokens=n_tok, n_sequences=n_seqs, accumulators=accs,
                            complete=True, extra={"summary": summary})
        write_outputs(result, config.out, figures=config.figures)
    barrier(info)
    if rank_ckpt is not None:
        rank_ckpt.unlink(missing_ok=True)
    return result


def scan_summary(identity, part_info, data, config, n_tok, n_seqs, world_size, model_name, elapsed,
                 tokens_per_s) -> dict[str, Any]:
    shape = identity["model_shape"]
    return {
        "n_tokens": int(n_tok),
        "n_sequences": int(n_seqs),
        "world_size": int(world_size),
        "sequences": [part_info["sequences"]],
        "batches": [part_info["batches"]],
        "shard": part_info["shard"],
        "n_sequences_total": part_info["n_sequences_total"],
        "model": {"name": model_name, **shape, "fingerprint": identity["model_fingerprint"]},
        "data": {**data, "n_tokens_used_total": part_info["n_sequences_total"] * config.seq_len},
        "config": {**identity["config"], "data": config.data, "shard": list(config.shard)},
        "elapsed_s": float(elapsed),  # of this session (a resumed run: since it resumed)
        "tokens_per_s": float(tokens_per_s),  # tokens measured in this session per second, all processes
    }
