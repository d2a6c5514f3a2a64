"""``bayesmanifold scan``: every per-head measurement streamed over a corpus.

One process, or several under ``torchrun --standalone --nproc-per-node N -m bayesmanifold scan``
(each rank a disjoint shard; rank 0 writes). ``--checkpoint-every`` and ``--resume`` make a run
that was killed continue where it stopped, with the same final result.
"""

import argparse
import os
import re

from ..corpus import DEFAULT_MEASURES, MEASURES, ScanConfig, scan
from ..corpus.scan import check_out_dir
from ..errors import ConfigError
from ..models.target import open_target
from .common import (
    add_json_arg,
    add_model_args,
    at_least,
    format_table,
    output_dir,
    seed,
    write_json,
)

NAME = "scan"
HELP = "stream the routing law, advantage statistics, attention entropy and value-update norms over a corpus"
EXAMPLE = "bayesmanifold scan toy --data corpus/ --seq-len 128 --out scan/ --json scan.json"


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_args(p, positional="model")
    p.add_argument("--data", required=True, metavar="PATH", help="a text file, a directory of text files, a .jsonl file (field \"text\") or a .npy array of token ids")
    p.add_argument("--format", default="auto", choices=["auto", "text", "jsonl", "tokens"], help="how to read --data (default: by its extension)")
    p.add_argument("--seq-len", type=at_least(2), default=128, help="tokens per window (default 128; at most the model's n_ctx)")
    p.add_argument("--batch-size", type=at_least(1), default=8, help="windows per pass (default 8)")
    p.add_argument("--max-tokens", type=at_least(1), default=None, metavar="N", help="use at most N tokens of the corpus (whole windows)")
    p.add_argument("--layers", default=None, metavar="LIST", help="layers to measure, e.g. 0,2,5 or 0-3 (default: all)")
    p.add_argument("--measures", default="default", metavar="LIST",
                   help=f"comma-separated from {', '.join(MEASURES)}; 'default' = {','.join(DEFAULT_MEASURES)}; 'all'")
    p.add_argument("--out", metavar="DIR", type=output_dir, help="write heads.csv/.parquet, summary.json, figures/, index.html and the resumable state here")
    p.add_argument("--overwrite", action="store_true", help="replace the finished scan, or discard the interrupted one's checkpoints, that --out holds (refused otherwise)")
    p.add_argument("--no-figures", action="store_true", help="skip the heatmap PNGs (faster)")
    add_json_arg(p)
    p.add_argument("--checkpoint-every", type=at_least(0), default=0, metavar="N", help="checkpoint every N batches (needs --out; default 0: only the final state)")
    p.add_argument("--resume", action="store_true", help="continue the run whose checkpoints are in --out")
    p.add_argument("--shard", default=None, metavar="K/N", help="measure only block K of N (0-based) of the corpus's batches; combine with 'bayesmanifold merge'")
    p.add_argument("--seed", type=seed, default=0, help="seed of the toy model's weights (recorded with the run)")


def parse_layers(text: str | None) -> tuple[int, ...] | None:
    if text is None:
        return None
    out: list[int] = []
    try:
        for part in (x.strip() for x in text.split(",")):
            rng = re.fullmatch(r"(\d+)-(\d+)", part)
            if not rng and not re.fullmatch(r"\d+", part):
                raise ValueError(part)
            out += list(range(int(rng[1]), int(rng[2]) + 1)) if rng else [int(part)]
    except ValueError:
        raise ConfigError(f"--layers {text!r} not understood; give layer indices counted from 0, e.g. 0,2,5 or 0-3 "
                          "(no negative indices)") from None
    return tuple(out)


def parse_measures(text: str) -> tuple[str, ...]:
    names: list[str] = []
    for n in (x.strip() for x in text.split(",")):
        names += list(DEFAULT_MEASURES) if n == "default" else list(MEASURES) if n == "all" else [n] if n else []
    return tuple(names)


def parse_shard(text: str | None) -> tuple[int, int]:
    if text is None:
        return (0, 1)
    try:
        k, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise ConfigError(f"--shard {text!r} not understood; use K/N, e.g. 0/4 (K counts from 0)") from None
    return (k, n)


def _device(spec: str) -> str:
    if spec == "cuda" and "LOCAL_RANK" in os.environ:
        return f"cuda:{int(os.environ['LOCAL_RANK'])}"
    return spec


def run(args: argparse.Namespace) -> int:
    config = ScanConfig(
        data=args.data,
        format=args.format,
        seq_len=args.seq_len,
        batch_size=args.batch_size,
        max_tokens=args.max_tokens,
        layers=parse_layers(args.layers),
        measures=parse_measures(args.measures),
        out=args.out,
        checkpoint_every=args.checkpoint_every,
        resume=args.resume,
        seed=args.seed,
        shard=parse_shard(args.shard),
        figures=not args.no_figures,
        overwrite=args.overwrite,
    )
    check_out_dir(config.out, resume=config.resume, overwrite=config.overwrite)  # before the model is loaded
    # under torchrun, --device cuda means this process's GPU (cuda:LOCAL_RANK)
    model = open_target(args.model, device=_device(args.device), dtype=args.dtype, seed=args.seed,
                        tokenizer=args.tokenizer).model
    res = scan(model, config, model_name=args.model)
    if int(os.environ.get("RANK", "0")) != 0:
        return 0
    print_result(res, f"scan {args.model} on {args.data}")
    write_json(args.json, res.to_dict())
    return 0


def print_result(res, title: str) -> None:
    """A short report of a scan or merge: what was read, per-layer means, the law's verdict."""
    s = res.summary
    data = s.get("data", {})
    how = {"tokenizer": "the model's tokenizer", "utf8-bytes": "UTF-8 bytes (the model has no tokenizer)",
           "token-ids": "token ids"}.get(data.get("tokenization"), data.get("tokenization"))
    print(title)
    print(f"read as {data.get('format')} with {how}: {s['n_tokens']} tokens in {s['n_sequences']} sequences, "
          f"{s['world_size']} process(es)" + (f", {s['tokens_per_s']:.0f} tokens/s" if s.get("tokens_per_s") == s.get("tokens_per_s") else ""))
    df = res.to_dataframe()
    cols = [c for c in ("rel_residual_dscores", "mass_positive", "routing_effective_keys", "attention_entropy",
                        "value_update_norm_mean") if c in df]
    if cols:
        agg = {"rel_residual_dscores": "max"}
        per_layer = df.groupby("layer")[cols].agg({c: agg.get(c, "mean") for c in cols}).reset_index()
        heads = {"rel_residual_dscores": "max rel resid", "mass_positive": "α mass A>0", "routing_effective_keys": "eff. keys",
                 "attention_entropy": "entropy", "value_update_norm_mean": "‖Δv‖ mean"}
        fmt = {"rel_residual_dscores": ".2e", "value_update_norm_mean": ".3e"}
        print(format_table(per_layer.to_dict("records"),
                           [("layer", "layer", "d")] + [(c, heads[c], fmt.get(c, ".3f")) for c in cols]))
    if s.get("routing_law_holds") is not None:
        print(f"max relative routing-law residual {s['max_rel_residual_dscores']:.3e}; the laws hold on every head: "
              f"{'yes' if s['routing_law_holds'] else 'NO'}")
