"""``bayesmanifold sula``: Paper III's in-context Bayesian updating test on a model that reads text.

Prompts of k labelled examples ``"x_i: L"`` and a query, each example's label equal to a latent
label with probability 1 − ε; the model's posterior over the two candidate labels (each scored as
a whole word) against the exact Bayesian posterior: the entropy MAE in bits, and how PC1 of the
query's final-layer values moves with the evidence (see :mod:`bayesmanifold.analyses.sula`).
"""

import argparse
from pathlib import Path

from .common import (
    add_json_arg,
    add_model_args,
    add_seed_arg,
    at_least,
    format_table,
    open_model_from,
    output_file,
    write_json,
)

NAME = "sula"
HELP = "Paper III's in-context Bayesian updating test: model vs exact posterior over two noisy labels, and PC1"
EXAMPLE = "bayesmanifold sula smollm2-135m --n-per-k 50 --controls --json sula.json --plot sula.png"
PLOT_FORMATS = ("png", "pdf", "svg")

_Bad = argparse.ArgumentTypeError


def k_list(text: str) -> tuple[int, ...]:
    """Comma-separated integers >= 0, distinct (``--k 0,1,2,4,8``)."""
    parts = [t.strip() for t in text.split(",")]
    if not text.strip() or any(not t for t in parts):
        raise _Bad(f"expected comma-separated integers >= 0 such as 0,1,2,4,8, got {text!r}")
    try:
        ks = tuple(int(t) for t in parts)
    except ValueError:
        raise _Bad(f"expected comma-separated integers >= 0 such as 0,1,2,4,8, got {text!r}") from None
    bad = [k for k in ks if k < 0]
    if bad:
        raise _Bad(f"k counts examples and must be >= 0, got {bad[0]}")
    if len(set(ks)) != len(ks):
        raise _Bad(f"k values repeat: {text!r}")
    return ks


def word_list(text: str) -> tuple[str, ...]:
    """Comma-separated words (``--labels dax,lug,mip``); at least 2."""
    words = tuple(t.strip() for t in text.split(","))
    if len(words) < 2 or any(not w for w in words):
        raise _Bad(f"expected at least 2 comma-separated label words such as dax,lug, got {text!r}")
    return words


def plot_file(text: str) -> str:
    output_file(text)
    if Path(text).suffix.lower().lstrip(".") not in PLOT_FORMATS:
        raise _Bad(f"{text!r}: the plot is written as {', '.join(PLOT_FORMATS)}; give a path ending in one of them")
    return text


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_args(p, positional="model")
    p.add_argument("--k", type=k_list, default=(0, 1, 2, 4, 8), metavar="K,K,...",
                   help="numbers of in-context examples (default 0,1,2,4,8, as Paper III)")
    p.add_argument("--n-per-k", type=at_least(2), default=50, help="prompts per k (default 50, as Paper III)")
    p.add_argument("--labels", type=word_list, default=None, metavar="W,W,...",
                   help="candidate label words, a pair drawn per prompt (default: Paper III's dax,lug,mip,zorb,wug,kep,tuv,gax)")
    p.add_argument("--noise", type=float, default=0.1, help="chance an example's label is the other one (default 0.1)")
    p.add_argument("--controls", action="store_true",
                   help="also run the shuffled-labels and lexical-remap controls (3x the passes)")
    p.add_argument("--layer", type=int, default=-1, help="layer whose values give PC1 (default -1: the last, as Paper III)")
    add_seed_arg(p, help="seed of the prompts")
    add_json_arg(p)
    p.add_argument("--plot", metavar="PATH", type=plot_file, help="write the figure (calibration, PC1, trajectories) to PATH (.png, .pdf or .svg)")


def run(args: argparse.Namespace) -> int:
    from ..analyses.sula import LABELS, REMAP_LABELS, SulaConfig, sula_test

    labels = args.labels or LABELS
    remap = tuple(w for w in REMAP_LABELS + tuple(f"{w}x" for w in labels) if w not in labels)[: len(labels)]
    # every value is checked before the model is opened
    config = SulaConfig(ks=args.k, n_per_k=args.n_per_k, labels=labels, remap_labels=remap, noise=args.noise,
                        controls=args.controls, layer=args.layer, seed=args.seed)
    target = open_model_from(args, args.model)
    res = sula_test(target.model, config)
    s = res.summary()
    if args.json:
        write_json(args.json, {"model": args.model, **res.to_dict()})
    if args.plot:
        _write_plot(res, args.plot)
    rows = [{"k": k, "n": v["n"], "analytic": v["analytic_entropy"], "model": v["model_entropy"], "mae": v["entropy_mae"],
             "p_latent": v["model_p_latent"], "pc1": v["pc1_mean"]} for k, v in sorted(res.main.by_k().items())]
    print(format_table(rows, [("k", "k", "d"), ("n", "prompts", "d"), ("analytic", "H_Bayes", ".3f"), ("model", "H_model", ".3f"),
                              ("mae", "MAE", ".3f"), ("p_latent", "P(latent)", ".3f"), ("pc1", "mean PC1", ".2f")]))
    multi = sorted(w for w, n in s["label_tokens"].items() if n > 1)
    if multi:
        print(f"labels scored as whole words ({len(multi)} of {len(s['label_tokens'])} are several tokens)")
    print(f"entropy MAE {s['entropy_mae_bits']:.3f} bits (Paper III: 0.44 Pythia-410M, 0.36 Llama-3.2-1B, 0.31 Phi-2); "
          f"a model always certain would score {s['mae_if_always_certain_bits']:.3f}, always uniform "
          f"{s['mae_if_always_uniform_bits']:.3f}")
    print(f"rho(k, mean PC1) {_fmt(s['rho_k_mean_pc1'])}; |rho(PC1, analytic entropy)| {_fmt(s['abs_rho_pc1_analytic_entropy'])} "
          f"(Paper III: 0.65-0.80); PC1 = {s['pc1_share']:.1%} of the variance of {s['feature_kind']} "
          "(PC1 oriented to grow with the entropy)")
    print(f"the count control: k alone gives |rho(k, analytic entropy)| {_fmt(s['abs_rho_k_analytic_entropy'])}; within one k, "
          f"mean rho(PC1, analytic entropy) {_fmt(s['rho_pc1_evidence_entropy_within_k_mean'])}")
    for name, c in s["controls"].items():
        extra = (f", mean |dH| vs main {c['mean_abs_entropy_diff_vs_main']:.3f} bits" if name == "lexical_remap" else
                 f", MAE vs the counts' posterior {c['evidence_mae_bits']:.3f} bits")
        print(f"control {name}: entropy MAE {c['entropy_mae_bits']:.3f} bits{extra}")
    print(f"{len(res.main.texts) * len(res.conditions)} prompts in {res.seconds:.1f} s")
    return 0


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:+.2f}"


def _write_plot(res, path: str) -> None:
    import matplotlib.pyplot as plt

    from ..io import atomic_write

    axes = res.plot()
    fig = axes[0].figure
    fmt = Path(path).suffix.lower().lstrip(".")
    atomic_write(path, lambda p: fig.savefig(p, format=fmt, dpi=120))
    plt.close(fig)
