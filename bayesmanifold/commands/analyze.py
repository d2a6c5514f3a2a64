"""``bayesmanifold analyze``: the geometry and dynamics analyses on a checkpoint or a model.

On a wind-tunnel checkpoint (or a model given with ``--task``): key orthogonality of the
hypothesis-token keys, the value manifold at the scored positions coloured by Bayes entropy,
attention focusing, query–key alignment, value specialization over position buckets and, where
the checkpoint has a dynamics-monitor state or weight snapshots, the frame/precision stabilisation
steps. On a pretrained model with ``--prompts`` (a file, or a shipped set such as ``paper3-smollm2``):
Paper III's protocol at each prompt's final token; with ``--protocol authors`` also the variant of
the authors' LLM pipeline (:mod:`bayesmanifold.analyses.paper3_authors`), printed beside ours.
"""

import argparse
from pathlib import Path

from ..errors import InputError
from .common import (
    add_json_arg,
    add_model_options,
    add_seed_arg,
    add_target_args,
    at_least,
    format_table,
    open_model_from,
    output_dir,
    write_json,
)

NAME = "analyze"
HELP = "measure key orthogonality, value manifolds, attention focusing, specialization and training dynamics"
EXAMPLE = "bayesmanifold analyze bijection-v20 --out figures/ --json analyze.json"
FIGURE_DPI = 120


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_target_args(p)
    p.add_argument("--out", metavar="DIR", type=output_dir, help="write figures (PNG) to DIR")
    add_json_arg(p)
    add_model_options(p)
    add_seed_arg(p, help="seed of the sampled sequences and of the baselines")
    p.add_argument("--n-seqs", type=at_least(8), default=256, help="wind-tunnel sequences for the geometry (default 256)")
    p.add_argument("--features", choices=["residual", "values_concat", "head_outputs"], default=None,
                   help="representation for the value manifold (default: residual stream on wind tunnels, as Paper I's scripts; values_concat on prompts, as Paper III)")
    p.add_argument("--max-snapshots", type=at_least(2), default=40, help="replay at most this many weight snapshots (default 40)")
    p.add_argument("--no-dynamics", action="store_true", help="skip the training-dynamics replay")
    p.add_argument("--protocol", choices=["ours", "authors"], default="ours",
                   help="authors: also measure each claim as the authors' code does and print it beside ours (wind "
                   "tunnels: value manifold of the final-norm residual at the value positions, their focusing, their HMM "
                   "KL; with --prompts: Paper III as their LLM pipeline measures it, final layer, PCA of 10 components, "
                   "final-token key cosines)")
    p.add_argument("--dynamics-range", choices=["first-stage", "all"], default="first-stage",
                   help="for a checkpoint trained in stages (warm starts): replay the snapshots of the "
                   "first, from-scratch stage (default) or of every stage")


def write_figures(result, out: str | None) -> list[str]:
    """Each figure of a suite result as ``out/<name>.png`` (atomically); the paths written."""
    if out is None:
        return []
    import matplotlib.pyplot as plt

    from ..io import atomic_write, ensure_dir

    d = ensure_dir(out)
    written = []
    for name in result.figure_names:
        fig = result.figure(name)
        path = atomic_write(Path(d) / f"{name}.png", lambda p, fig=fig: fig.savefig(p, format="png", dpi=FIGURE_DPI))
        plt.close(fig)
        written.append(str(path))
    return written


def run(args: argparse.Namespace) -> int:
    from ..backends import model_access
    from ..models.checkpoint import refuse_unusable
    from ..suite import SuiteConfig, run_suite

    refuse_unusable(args.target, command="analyze", attention=True)
    config = SuiteConfig(seed=args.seed, n_seqs=args.n_seqs, features=args.features, prompts=args.prompts,
                         dynamics=not args.no_dynamics, max_snapshots=args.max_snapshots, dynamics_range=args.dynamics_range)
    target = open_model_from(args, args.target, task=args.task)
    if args.protocol == "authors" and not args.prompts:
        from ..suite import has_exact_posterior

        if not has_exact_posterior(target.task):
            raise InputError("--protocol authors needs a wind-tunnel checkpoint (or --task), or --prompts (Paper III's "
                             "protocol as the authors' LLM pipeline measures it)")
    result = run_suite(target, config)
    res = result.to_dict()
    res["target"] = str(args.target)
    access = model_access(target.model)
    res["model"] = {"n_layers": access.n_layers, "n_heads": access.n_heads, "d_model": access.d_model,
                    "n_key_value_heads": access.n_kv_heads, "dtype": str(target.dtype).removeprefix("torch."),
                    "backend": access.name}
    res["figures"] = figs = write_figures(result, args.out)
    rows = result.to_dataframe().rename(columns={"key_orthogonality": "ko", "attention_entropy": "ent"}).to_dict("records")
    print(f"analyze {args.target} ({res['mode']})")
    print(format_table(rows, [("layer", "layer", "d"), ("ko", "key orth.", ".3f"), ("ent", "attn entropy", ".3f")]))
    rho = res.get("spearman_pc1_entropy")
    print(
        f"value manifold ({res['manifold_features']}): PC1 {100 * res['value_pc1']:.1f}%, PC1+PC2 {100 * res['value_pc12']:.1f}%, "
        f"PR {res['participation_ratio']:.2f}, Spearman(PC1, entropy) {rho if rho is None else format(rho, '+.3f')}"
    )
    if res.get("value_manifold_untested"):
        print(f"value-manifold criterion {res['value_manifold_untested']}")
    print(f"attention-entropy reduction first→last: {100 * res['attention_entropy_reduction']:.1f}%")
    if "frame_stabilization_step" in res:
        print(
            f"frame stabilises {_at(res['frame_stabilization_step'])}, precision {_at(res['precision_stabilization_step'])} "
            f"(ratio {res['dissociation_ratio'] if res['dissociation_ratio'] is not None else 'n/a'}); settling (distance to "
            f"final): frame {_at(res['frame_settling_step'])}, values {_at(res['precision_settling_step'])}, "
            f"calibration {_at(res['calibration_settling_step'])}"
        )
    if args.protocol == "authors" and args.prompts:
        res["authors"] = _authors_paper3(target.model, args.prompts, res)
    elif args.protocol == "authors":
        res["protocols"], res["claims"] = _authors_side_by_side(target, res, args.seed)
    if figs:
        print(f"figures: {', '.join(figs)}")
    write_json(args.json, res)
    return 0


def _authors_paper3(model, prompts: str, res: dict) -> dict:
    """Paper III's protocol as the authors' LLM pipeline measures it, printed beside ours."""
    from ..analyses.paper3 import paper3_protocol

    a = paper3_protocol(model, prompts, protocol="authors").authors
    vm, ours = a.value_manifold, res["paper3"]
    mark = {True: "yes", False: "no", None: "untested"}
    print("\nauthors' protocol beside ours (Paper III's thresholds):")
    print(f"- value manifold: authors (final layer {a.layers[-1]}, PCA of {vm['n_components']}) PC1+PC2 "
          f"{100 * vm['pc12']:.1f}% [95% CI {100 * vm['pc12_ci'][0]:.1f}-{100 * vm['pc12_ci'][1]:.1f}], PR(top "
          f"{vm['n_components']}) {vm['participation_ratio_top']:.2f}, Pearson(PC1, entropy) {vm['pearson_pc1_entropy']:+.3f} "
          f"[{mark[a.criteria['value_manifold']]}]; ours (layer {ours['best_layer']}) PC1+PC2 {100 * ours['value_pc12']:.1f}% "
          f"[{mark[ours['criteria']['value_manifold']]}]")
    print(f"- key orthogonality: authors (final-token key |cos| between kv heads) {min(a.key_cos_kv):.3f}-"
          f"{max(a.key_cos_kv):.3f}, {100 * a.key_share_below():.0f}% of layers < 0.20 [{mark[a.criteria['key_orthogonality']]}]; "
          f"over query heads {min(a.key_cos_query_heads):.3f}-{max(a.key_cos_query_heads):.3f}; ours (W_K columns) "
          f"{100 * ours['key_orthogonality_share_below_0.20']:.0f}% of layers < 0.20 [{mark[ours['criteria']['key_orthogonality']]}]")
    print(f"- attention focusing: authors {100 * a.attention_entropy_reduction:.1f}% (bits), ours "
          f"{100 * ours['attention_entropy_reduction']:.1f}% (nats): the same statistic")
    print(f"- the authors' k/v reshaping on this model: {a.gqa_reshape}")
    return a.to_dict()


def _at(step) -> str:
    return "not within the replayed snapshots" if step is None else f"at step {step}"


def _authors_side_by_side(target, res: dict, seed: int) -> tuple[dict, list]:
    """Measure the authors' protocols, print each claim on both protocols; (numbers, findings)."""
    from dataclasses import asdict

    from ..analyses.protocols import ProtocolConfig, measure_protocols
    from ..report.claims import CLAIMS, judge_claims
    from ..windtunnels.calibration import measure_calibration

    proto = measure_protocols(target.model, target.task, ProtocolConfig(seed=seed)).to_dict()
    cal = measure_calibration(target.model, target.task, n_seqs=1000, generator=12345)
    m = {"task": target.task.to_dict(), "analyze": res, "protocols": proto,
         "calibration": {"entropy_mae_bits": cal.entropy_mae_bits, "mean_kl_bits": cal.mean_kl_bits}}
    names = ("calibration", "value_manifold", "attention_focusing", "two_timescales")
    findings = judge_claims(m, [c for c in CLAIMS if c.name in names])
    mark = {True: "yes", False: "no", None: "—"}
    print("\nauthors' protocol beside ours (same thresholds):")
    for f in findings:
        print(f"- {f.claim}\n    paper: {f.paper}\n    authors' protocol: {f.authors_measured or '—'} "
              f"[held: {mark[f.authors_held] if f.authors_measured else '—'}]\n    our protocol: {f.measured} [held: {mark[f.held]}]")
    return proto, [asdict(f) for f in findings]
