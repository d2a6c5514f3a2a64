"""``bayesmanifold map``: the per-token routing map of a prompt, as a self-contained HTML page."""

import argparse
import os
import sys
from pathlib import Path

from ..errors import InputError
from ..io import atomic_write_text
from .common import (
    add_model_args,
    at_least,
    format_table,
    input_file,
    open_model_from,
    output_file,
    seed,
    write_json,
)

NAME = "map"
HELP = "per head and token: attention α, advantage A = b̄ − b and routing force αA of a prompt, as an HTML page"
EXAMPLE = "bayesmanifold map smollm2-135m --prompt-file prompt.txt --top 40 --out map.html --json map.json"

# the library's RANKABLE and the page's shades, written out so that --help imports no torch
_RANKABLE = ("total_abs_force", "mass_positive", "max_abs_push", "max_value_update", "induction", "previous_token")
_SHADES = (*_RANKABLE, "entropy", "law_residual")


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_args(p, positional="model")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", metavar="TEXT", help="the prompt text")
    src.add_argument("--prompt-file", metavar="FILE", type=input_file, help="read the prompt from a UTF-8 text file")
    p.add_argument("--heads", metavar="L.H,...", default=None, type=head_list, help="heads to map, e.g. 0.1,1.3 or 1.* (default: all)")
    p.add_argument("--objective", default="next-token", metavar="NAME",
                   help="next-token (default: mean next-token cross-entropy over the prompt), last, or pos:P[,P...]")
    p.add_argument("--top", type=at_least(1), default=None, metavar="K",
                   help="keep the matrices of only the K heads with the largest --by summary (every head keeps its "
                        "summaries in the grid; default: all heads' matrices)")
    p.add_argument("--by", default="total_abs_force", choices=_RANKABLE,
                   help="the summary --top ranks heads by (default total_abs_force, the total |force|)")
    p.add_argument("--shade", default=None, choices=_SHADES, help="the summary that shades the head grid (default: --by)")
    p.add_argument("--seed", type=seed, default=0, help="seed of the toy model's weights")
    p.add_argument("--title", default=None, help="page title (default: model and prompt length)")
    p.add_argument("--out", required=True, metavar="HTML", type=output_file, help="write the page here")
    p.add_argument("--json", metavar="PATH", type=output_file, help="also write the per-head summaries as JSON, and the kept "
                                                                    "heads' matrices (float16) in a .npz of the same name beside it")


def head_list(text: str) -> str:
    """``L.H,...`` with indices counted from 0 (``L.*``: every head of layer L), checked as parsed."""
    import re

    for item in text.split(","):
        if not re.fullmatch(r"\s*\d+\.(\d+|\*)\s*", item):
            raise argparse.ArgumentTypeError(
                f"head {item.strip()!r} not understood; give LAYER.HEAD with indices counted from 0, e.g. 0.1,1.3 "
                "(1.* for a whole layer; no negative indices)")
    return text


def npz_path(json_path: str) -> str:
    """Where the matrices go beside the summary JSON: the same name with the suffix .npz."""
    p = Path(json_path)
    if p.suffix == ".npz":
        raise InputError(f"--json {json_path!r} ends in .npz; the matrices go to a .npz beside the JSON: give a .json path")
    return str(p.with_suffix(".npz"))


def read_prompt(args: argparse.Namespace) -> str:
    if args.prompt is not None:
        text = args.prompt
    else:
        f = Path(args.prompt_file)
        if not f.is_file():
            raise InputError(f"--prompt-file {args.prompt_file!r} does not exist")
        try:
            text = f.read_text(encoding="utf-8")
        except UnicodeDecodeError as exc:
            raise InputError(f"--prompt-file {args.prompt_file!r} is not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    if not text:
        raise InputError("the prompt is empty; give at least two tokens of text")
    return text


def run(args: argparse.Namespace) -> int:
    from ..analyses import routing_maps as rm
    from ..analyses.routing_map_result import rank_value

    if args.json:  # --out and --json were checked as the command line was parsed; the .npz beside --json here
        try:
            output_file(npz_path(args.json))
        except argparse.ArgumentTypeError as exc:
            raise InputError(f"--json's .npz: {exc}") from None
    prompt = read_prompt(args)
    from ..models.checkpoint import refuse_unusable

    refuse_unusable(args.model, command="map", text=True, attention=True)
    model = open_model_from(args).model
    n_tokens = int(rm.prompt_tokens(model, prompt).shape[1])
    n_heads = sum(len(h) for h in rm.parse_heads(args.heads, model).values())
    fp = rm.map_footprint(n_tokens, n_heads, args.top)
    if fp["page_bytes"] > 25e6 and fp["matrix_bytes"] <= rm.MAX_MATRIX_BYTES:
        print(f"bayesmanifold map: note: {fp['kept']} heads × {n_tokens} tokens: the page will take about "
              f"{fp['page_bytes'] / 1e6:.0f} MB; --top K keeps fewer heads' matrices", file=sys.stderr)
    m = rm.routing_map(model, prompt, heads=args.heads, objective=args.objective, top=args.top, by=args.by)
    title = args.title or f"Routing map: {args.model}, {len(m.token_ids)} tokens"
    atomic_write_text(args.out, m.to_html(title=title, shade=args.shade))
    if args.json:
        m.save_npz(npz_path(args.json))
        write_json(args.json, {**m.to_dict(), "matrices": Path(npz_path(args.json)).name})
    rows = sorted(m.summaries, key=lambda r: (-rank_value(r, args.by), r["layer"], r["head"]))
    for r in rows:
        r["name"] = f"{r['layer']}.{r['head']}"
    print(f"{args.model}: {len(m.token_ids)} tokens, objective {m.objective}, loss {m.loss:.4f}, "
          f"{len(rows)} heads measured, matrices of {len(m.heads)} kept")
    print(format_table(rows[:12], [("name", "head", "s"), ("total_abs_force", "Σ|force|", ".4g"),
                                   ("mass_positive", "α on A>0", ".3f"), ("entropy", "entropy", ".3f"),
                                   ("induction", "induction", ".3f"), ("law_residual", "law resid", ".1e")]))
    sizes = f"page: {args.out} ({_mb(args.out)})"
    if args.json:
        sizes += f"  json: {args.json} ({_mb(args.json)})  matrices: {npz_path(args.json)} ({_mb(npz_path(args.json))})"
    print(sizes)
    return 0


def _mb(path: str) -> str:
    return f"{os.path.getsize(path) / 1e6:.1f} MB"
