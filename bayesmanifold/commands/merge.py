"""``bayesmanifold merge``: combine scans of disjoint shards that ran apart (array jobs, machines)."""

import argparse

from ..corpus import merge_runs
from ..corpus.merge import check_merge_out
from .common import add_json_arg, output_dir, write_json
from .scan import print_result

NAME = "merge"
HELP = "merge finished 'bayesmanifold scan --shard K/N' runs of one corpus into one result"
EXAMPLE = "bayesmanifold merge scan-0/ scan-1/ --out scan/ --json scan.json"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("dirs", nargs="+", metavar="DIR", help="output directories of finished scans (same model, data and configuration)")
    p.add_argument("--out", metavar="DIR", type=output_dir, help="write the merged heads.csv, summary.json, figures, index.html and state here (a new directory: never one of the merged scans)")
    p.add_argument("--overwrite", action="store_true", help="replace a merged scan that --out already holds")
    p.add_argument("--no-figures", action="store_true", help="skip the heatmap PNGs (faster)")
    add_json_arg(p)


def run(args: argparse.Namespace) -> int:
    check_merge_out(args.dirs, args.out, overwrite=args.overwrite)
    res = merge_runs(args.dirs, out=args.out, figures=not args.no_figures, overwrite=args.overwrite)
    print_result(res, f"merge of {len(args.dirs)} scans")
    if not res.summary.get("covers_whole_corpus", True):
        s = res.summary
        print(f"note: the parts cover batches {s['batches']} of 0..{s['n_batches_total'] - 1}, not the whole corpus")
    write_json(args.json, res.to_dict())
    return 0
