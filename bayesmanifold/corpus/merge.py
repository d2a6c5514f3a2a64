"""Combining scans that could not share a process group (array jobs, separate machines).

Each part is the output directory of a finished :func:`~bayesmanifold.corpus.scan` (its
``state.pt``), usually run with ``shard=(i, n)``. :func:`merge_runs` checks that every part comes
from the same model, data and configuration (the fingerprints recorded in the state) and that
their batches are disjoint, merges the accumulator states in batch order, and returns the
result; the merged output directory is itself a part that can be merged again.
"""

import os
import time
from pathlib import Path
from typing import Any

from ..errors import CheckpointError, ConfigError, InputError
from .measures import ModelShape
from .result import ScanResult, build_result
from .scan import FINAL_STATE, identity_mismatch, merge_states
from .state import load_checkpoint, save_checkpoint

__all__ = ["merge_runs"]


def merge_runs(dirs: list[str | os.PathLike], out: str | os.PathLike | None = None, *, figures: bool = True,
               overwrite: bool = False) -> ScanResult:
    """Merge finished scans of disjoint parts of one corpus; write the result to ``out`` if given
    (with heatmaps unless ``figures`` is False).

    Raises:
        CheckpointError: a directory without a finished scan, or parts from another model, data
            or configuration.
        InputError: fewer than two parts, or parts that overlap.
        ConfigError: ``out`` is one of the parts (it would replace that shard's result), or holds
            a scan already and ``overwrite`` is not set.
    """
    if len(dirs) < 2:
        raise InputError(f"merge needs at least two scan directories, got {len(dirs)}")
    check_merge_out(dirs, out, overwrite=overwrite)
    parts = []
    for d in dirs:
        path = Path(d) / FINAL_STATE
        if not path.is_file():
            raise CheckpointError(f"{str(d)!r} holds no finished scan ({FINAL_STATE} missing): finish or resume that scan first")
        ck = load_checkpoint(path)
        if not ck["complete"]:
            raise CheckpointError(f"{str(path)!r} is an unfinished scan; resume it before merging")
        parts.append((str(d), ck))
    ref_dir, ref = parts[0]
    for d, ck in parts[1:]:
        diff = identity_mismatch(ref["identity"], ck["identity"])
        if diff:
            raise CheckpointError(f"{d!r} does not come from the same run as {ref_dir!r}: it differs in {diff}")
    spans = sorted((r[0], r[1], d) for d, ck in parts for r in _ranges(ck))
    for (a0, a1, d0), (b0, b1, d1) in zip(spans, spans[1:]):
        if b0 < a1:
            raise InputError(
                f"{d0!r} (batches {a0}..{a1 - 1}) and {d1!r} (batches {b0}..{b1 - 1}) overlap: "
                "merged parts must cover disjoint shards"
            )
    parts.sort(key=lambda p: min(r[0] for r in _ranges(p[1])))
    t0 = time.perf_counter()
    identity = ref["identity"]
    cfg = identity["config"]
    shape = ModelShape.from_dict(identity["model_shape"])
    accs = merge_states([ck["accumulators"] for _, ck in parts], tuple(cfg["measures"]), shape)
    n_tok = sum(ck["n_tokens"] for _, ck in parts)
    n_seq = sum(ck["n_sequences"] for _, ck in parts)
    base: dict[str, Any] = dict(ref["extra"].get("summary", {}))
    ranges = _coalesce([r for _, ck in parts for r in _ranges(ck)])
    n_total = ref["part"]["n_batches_total"]
    covered = sum(b - a for a, b in ranges)
    B, n_seq_total = cfg["batch_size"], ref["part"]["n_sequences_total"]
    seq_ranges = [[a * B, min(b * B, n_seq_total)] for a, b in ranges]
    summary = {
        **base,
        "n_tokens": int(n_tok),
        "n_sequences": int(n_seq),
        "world_size": int(sum(ck["extra"].get("summary", {}).get("world_size", 1) for _, ck in parts)),
        "sequences": seq_ranges,
        "batches": ranges,
        "shard": None,
        "merged_from": [{"dir": d, "batches": _ranges(ck), "n_tokens": ck["n_tokens"]} for d, ck in parts],
        "covers_whole_corpus": covered == n_total,
        "n_batches_total": n_total,
        "elapsed_s": float(time.perf_counter() - t0),
        "tokens_per_s": float("nan"),
    }
    result = build_result(accs, summary)
    if out is not None:
        from .output import write_outputs

        part = {**ref["part"], "batches": [ranges[0][0], ranges[-1][1]], "ranges": ranges, "sequences": seq_ranges,
                "shard": None}
        save_checkpoint(Path(out) / FINAL_STATE, identity=identity, part=part, next_batch=ranges[-1][1],
                        n_tokens=n_tok, n_sequences=n_seq, accumulators=accs, complete=True, extra={"summary": summary})
        write_outputs(result, out, figures=figures)
    return result


def check_merge_out(dirs: list[str | os.PathLike], out: str | os.PathLike | None, *, overwrite: bool) -> None:
    """Refuse an ``out`` that is one of the merged parts (never, even with ``overwrite``: the
    part's own result would be replaced by the merge) or that holds a scan already."""
    if out is None:
        return
    o = Path(out).resolve()
    for d in dirs:
        if Path(d).resolve() == o:
            raise ConfigError(f"--out {str(out)!r} is one of the scans being merged: the merge would replace that shard's "
                              "result; write the merge to a new directory")
    if not overwrite and (o / FINAL_STATE).is_file():
        raise ConfigError(f"--out {str(out)!r} holds a scan already ({FINAL_STATE}): give a new directory, or pass "
                          "--overwrite to replace it")


def _ranges(ck: dict) -> list[list[int]]:
    """The batch ranges a finished scan covers (a merged one may cover several)."""
    p = ck["part"]
    return [list(r) for r in p.get("ranges", [p["batches"]])]


def _coalesce(ranges: list[list[int]]) -> list[list[int]]:
    out: list[list[int]] = []
    for a, b in sorted(ranges):
        if out and out[-1][1] == a:
            out[-1][1] = b
        else:
            out.append([a, b])
    return out
