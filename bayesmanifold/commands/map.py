"""``bayesmanifold map``: the per-token routing map of a prompt, as a self-contained HTML page."""

import argparse
import os
from pathlib import Path

from ..errors import InputError
from ..io import atomic_write_text
from .common import (
    add_model_args,
    format_table,
    input_file,
    open_model_from,
    output_file,
    seed,
    write_json,
)

NAME = "map"
HELP = "per head and token: attention α, advantage A = b̄ − b and routing force αA of a prompt, as an HTML page"
EXAMPLE = "bayesmanifold map stdlib-attn2 --prompt-file prompt.py --heads 1.0,1.1 --out map.html --json map.json"


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_args(p, positional="model")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", metavar="TEXT", help="the prompt text")
    src.add_argument("--prompt-file", metavar="FILE", type=input_file, help="read the prompt from a UTF-8 text file")
    p.add_argument("--heads", metavar="L.H,...", default=None, type=head_list, help="heads to map, e.g. 0.1,1.3 or 1.* (default: all)")
    p.add_argument("--objective", default="next-token", metavar="NAME",
                   help="next-token (default: mean next-token cross-entropy over the prompt), last, or pos:P[,P...]")
    p.add_argument("--seed", type=seed, default=0, help="seed of the toy model's weights")
    p.add_argument("--title", default=None, help="page title (default: model and prompt length)")
    p.add_argument("--out", required=True, metavar="HTML", type=output_file, help="write the page here")
    p.add_argument("--json", metavar="PATH", type=output_file, help="also write the matrices as JSON (prompt, token_ids, tokens, heads)")


def head_list(text: str) -> str:
    """``L.H,...`` with indices counted from 0 (``L.*``: every head of layer L), checked as parsed."""
    import re

    for item in text.split(","):
        if not re.fullmatch(r"\s*\d+\.(\d+|\*)\s*", item):
            raise argparse.ArgumentTypeError(
                f"head {item.strip()!r} not understood; give LAYER.HEAD with indices counted from 0, e.g. 0.1,1.3 "
                "(1.* for a whole layer; no negative indices)")
    return text


def check_writable(path: str, what: str) -> None:
    """Raise InputError unless ``path`` can be created or overwritten as a file."""
    p = Path(path)
    parent = p.parent if str(p.parent) else Path(".")
    if p.is_dir():
        raise InputError(f"{what} {path!r} is a directory; give a file path")
    if not parent.is_dir():
        raise InputError(f"cannot write {what} {path!r}: directory {str(parent)!r} does not exist")
    if not os.access(parent, os.W_OK) or (p.exists() and not os.access(p, os.W_OK)):
        raise InputError(f"cannot write {what} {path!r}: permission denied")


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
    from ..analyses.routing_maps import routing_map

    check_writable(args.out, "--out")
    if args.json:
        check_writable(args.json, "--json")
    prompt = read_prompt(args)
    from ..models.checkpoint import refuse_unusable

    refuse_unusable(args.model, command="map", text=True, attention=True)
    model = open_model_from(args).model
    m = routing_map(model, prompt, heads=args.heads, objective=args.objective)
    title = args.title or f"Routing map: {args.model}, {len(m.token_ids)} tokens"
    atomic_write_text(args.out, m.to_html(title=title))
    write_json(args.json, m.to_dict())
    rows = sorted(m.summaries, key=lambda r: -r["total_abs_force"])
    for r in rows:
        r["name"] = f"{r['layer']}.{r['head']}"
    print(f"{args.model}: {len(m.token_ids)} tokens, objective {m.objective}, loss {m.loss:.4f}, {len(rows)} heads")
    print(format_table(rows[:12], [("name", "head", "s"), ("total_abs_force", "Σ|force|", ".4g"),
                                   ("mass_positive", "α on A>0", ".3f"), ("entropy", "entropy", ".3f"),
                                   ("max_abs_push", "max|push|", ".4g"), ("law_residual", "law resid", ".1e")]))
    print(f"page: {args.out}" + (f"  json: {args.json}" if args.json else ""))
    return 0
