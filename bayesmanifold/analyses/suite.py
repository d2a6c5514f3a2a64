"""The geometry and dynamics suite behind ``analyze``, ``report`` and ``demo``.

On a wind-tunnel model (:func:`windtunnel_suite`): key orthogonality of the hypothesis-token keys,
the value manifold at the scored positions coloured by Bayes entropy, attention focusing,
query–key alignment, value specialization over position buckets and, where the checkpoint has a
dynamics-monitor state or weight snapshots, the frame/precision stabilisation steps. On any other
model (:func:`text_suite`): Paper III's protocol on prompts, or the same measures on random tokens.
Options come as an ``argparse.Namespace`` with the ``analyze`` command's fields.
"""

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import CheckpointError, InputError
from ..io import atomic_write

__all__ = ["load_target", "windtunnel_suite", "text_suite"]


def load_target(args: argparse.Namespace) -> tuple[Any, Any, dict, dict, Path | None]:
    """(model, task, config, history, checkpoint_dir)."""
    target = args.target
    ckpt_dir = None
    try:
        from ..models import checkpoint as ck

        try:
            ckpt_dir = ck.resolve_checkpoint(target)
        except CheckpointError:
            ckpt_dir = None
        if ckpt_dir is not None and not _is_our_checkpoint(ckpt_dir):
            ckpt_dir = None  # e.g. a HuggingFace directory: loaded as a model below
        if ckpt_dir is not None:
            model, task, cfg, history = ck.load_checkpoint(ckpt_dir, device=args.device)
            return model, task, cfg, history, ckpt_dir
    except ImportError:  # pragma: no cover - checkpoint module absent
        pass
    from ..hooks.loading import load_model

    model = load_model(target, device=args.device, dtype=args.dtype, seed=args.seed)
    task = None
    if args.task:
        from ..windtunnels.registry import task_from_dict

        task = task_from_dict({"task": args.task})
        if task.d_vocab > model.cfg.d_vocab or task.seq_len > model.cfg.n_ctx:
            raise InputError(f"task {args.task} (d_vocab {task.d_vocab}, seq_len {task.seq_len}) does not fit the model (d_vocab {model.cfg.d_vocab}, n_ctx {model.cfg.n_ctx})")
    return model, task, {}, {}, None


def _is_our_checkpoint(d: Path) -> bool:
    """A directory whose config.json declares the bayesmanifold checkpoint format."""
    f = d / "config.json"
    if not f.is_file():
        return False
    try:
        cfg = json.loads(f.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return False
    return isinstance(cfg, dict) and str(cfg.get("format", "")).startswith("bayesmanifold.checkpoint")


def _save_fig(result: Any, out: Path | None, name: str, written: list[str]) -> None:
    if out is None:
        return
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    ax = result.plot()
    fig = ax.figure
    fig.tight_layout()
    path = out / f"{name}.png"
    atomic_write(path, lambda p: fig.savefig(p, format="png", dpi=120))
    plt.close(fig)
    written.append(str(path))


def _position_groups(n_pos: int, n_buckets: int = 4) -> torch.Tensor:
    return torch.clamp((torch.arange(n_pos) * n_buckets) // max(n_pos, 1), max=n_buckets - 1)


def _dynamics_from_history(history: dict):
    from ..analyses.dynamics import DynamicsResult

    cbs = history.get("callbacks") or {}
    for name, state in cbs.items():
        if isinstance(state, dict) and "attention_drift" in state and state.get("steps"):
            if len(state["steps"]) >= 4:
                return DynamicsResult.from_state(state), f"history.callbacks.{name}"
    return None, None


def windtunnel_suite(model: Any, task: Any, args: argparse.Namespace, history: dict, ckpt_dir: Path | None, out: Path | None, figs: list[str]) -> dict:
    from ..analyses import dynamics as dyn
    from ..analyses.attention import attention_entropy, query_key_alignment
    from ..analyses.features import collect_features, describe_features
    from ..analyses.keys import key_orthogonality
    from ..analyses.manifold import ManifoldAccumulator
    from ..analyses.monitor import DynamicsMonitor
    from ..analyses.specialization import specialization

    batch = task.sample(int(args.n_seqs), generator=int(args.seed))
    toks = batch.tokens
    B, P = toks.shape
    qmask = torch.zeros(B, P, dtype=torch.bool)
    qmask[:, batch.positions] = True
    h_bayes = batch.bayes_entropy_bits().reshape(-1)  # row-major (batch, scored position)
    res: dict[str, Any] = {"mode": "windtunnel", "task": task.to_dict(), "n_seqs": int(B)}

    ko = key_orthogonality(model, definition="tokens", token_ids=task.answer_tokens, seed=args.seed)
    _save_fig(ko, out, "key_orthogonality", figs)
    res["key_orthogonality"] = ko.per_layer.tolist()
    res["key_orthogonality_definition"] = "hypothesis-token keys (answer tokens; LN1(W_E) W_K + b_K), mean off-diagonal cosine"
    res["key_orthogonality_gaussian"] = ko.gaussian
    res["key_orthogonality_random_init"] = ko.random_init_per_layer.tolist()
    ka = key_orthogonality(model, definition="tokens", token_ids=task.answer_tokens, seed=args.seed, absolute=True)
    res["key_orthogonality_abs"] = ka.per_layer.tolist()
    res["key_orthogonality_abs_random_init"] = ka.random_init_per_layer.tolist()
    res["key_orthogonality_abs_gaussian"] = ka.gaussian
    kc = key_orthogonality(model, definition="columns", seed=args.seed)
    res["key_orthogonality_columns"] = kc.per_layer.tolist()
    res["key_orthogonality_columns_random_init"] = kc.random_init_per_layer.tolist()

    kinds = ["residual", "values_concat"]
    main_kind = args.features or "residual"
    if main_kind not in kinds:
        kinds.append(main_kind)
    manifolds = {}
    for kind in kinds:
        acc = ManifoldAccumulator(standardize=False, feature_kind=describe_features(model, kind, -1, None), scalar_name="Bayes entropy (bits)")
        for s in range(0, B, 128):
            f = collect_features(model, toks[s : s + 128], kind=kind, layer=-1, positions=qmask[s : s + 128])
            acc.update(f, h_bayes.reshape(B, -1)[s : s + 128].reshape(-1))
        r = acc.finalize()
        manifolds[kind] = r
        if kind == main_kind:
            _save_fig(r, out, "value_manifold", figs)
    m = manifolds[main_kind]
    res.update(
        value_pc1=m.pc1_share,
        value_pc12=m.pc12_share,
        participation_ratio=m.participation_ratio,
        spearman_pc1_entropy=m.spearman_pc1,
        r2_pc1_entropy=m.r2_pc1,
        manifold_features=m.feature_kind,
        manifolds={k: v.summary() for k, v in manifolds.items()},
    )
    ent = attention_entropy(model, [(toks, None, qmask)])
    _save_fig(ent, out, "attention_entropy", figs)
    res["attention_entropy"] = ent.per_layer.tolist()
    res["attention_entropy_reduction"] = ent.reduction
    qk = query_key_alignment(model, [(toks[:64], None, qmask[:64])])
    res["query_key_alignment"] = qk.per_layer.tolist()
    groups = _position_groups(P)
    spec = specialization(model, [(toks, groups)], n_groups=4)
    _save_fig(spec, out, "specialization", figs)
    res["specialization"] = spec.per_head()
    res["specialization_groups"] = "query position buckets (4 equal buckets over the sequence)"

    if not args.no_dynamics:
        d, source = _dynamics_from_history(history)
        if d is None and ckpt_dir is not None and (ckpt_dir / "snapshots").is_dir() and any((ckpt_dir / "snapshots").glob("step_*.pt")):
            from ..windtunnels.calibration import measure_calibration

            probe = task.sample(32, generator=int(args.seed) + 1).tokens
            pm = torch.zeros(probe.shape, dtype=torch.bool)
            pm[:, task.positions if hasattr(task, "positions") else batch.positions] = True

            def cal(mod: Any) -> float:
                return float(measure_calibration(mod, task, n_seqs=256, generator=int(args.seed) + 2).entropy_mae_bits)

            mon = DynamicsMonitor(probe, every=1, query_positions=pm, key_token_ids=task.answer_tokens.tolist(), calibration_fn=cal)
            from ..models.checkpoint import read_config

            max_step, which = _replay_range(read_config(ckpt_dir), getattr(args, "dynamics_range", "first-stage"))
            d = dyn.replay(ckpt_dir, model, mon, max_snapshots=args.max_snapshots, max_step=max_step)
            source = f"replay of {len(d.steps)} snapshots, steps {d.steps[0]}–{d.steps[-1]}{which}"
        if d is not None:
            _save_fig(d, out, "dynamics", figs)
            res["frame_stabilization_step"] = d.frame_stabilization_step
            res["precision_stabilization_step"] = d.precision_stabilization_step
            res["dissociation_ratio"] = d.dissociation_ratio
            res["frame_settling_step"] = d.frame_settling_step
            res["precision_settling_step"] = d.precision_settling_step
            res["calibration_settling_step"] = d.calibration_settling_step
            res["settling_ratio"] = d.settling_ratio
            res["dynamics_source"] = source
            res["dynamics"] = d.summary()
    evals = history.get("eval") if isinstance(history, dict) else None
    if evals:
        res["final_entropy_mae_bits"] = evals[-1].get("entropy_mae_bits")
    return res


def _replay_range(cfg: dict, how: str) -> tuple[int | None, str]:
    """(last step to replay, description) for a checkpoint's recorded training lineage."""
    if how not in ("first-stage", "all"):
        raise InputError(f"dynamics range must be 'first-stage' or 'all'; got {how!r}")
    lineage = cfg.get("lineage") or []
    if how == "all" or not lineage:
        return None, ""
    first = lineage[0]
    end = int(first.get("step_offset", 0)) + int(first["steps"])
    return end, f" (the from-scratch stage, 1 of {len(lineage) + 1}; 'all' replays every stage)"


def text_suite(model: Any, args: argparse.Namespace, out: Path | None, figs: list[str]) -> dict:
    from ..analyses.attention import attention_entropy
    from ..analyses.keys import key_orthogonality
    from ..analyses.paper3 import paper3_protocol, read_prompts, tokenize_prompt
    from ..analyses.specialization import specialization

    res: dict[str, Any] = {"mode": "prompts" if args.prompts else "random-tokens"}
    if args.prompts:
        p3 = paper3_protocol(model, args.prompts)
        _save_fig(p3, out, "paper3", figs)
        i = p3.layers.index(p3.best_layer)
        res.update(
            key_orthogonality=p3.key_orthogonality.tolist(),
            key_orthogonality_definition="W_K columns per head, mean off-diagonal |cos| (Paper III)",
            value_pc1=float(p3.pc1[i]),
            value_pc12=float(p3.pc12[i]),
            participation_ratio=float(p3.participation_ratio[i]),
            spearman_pc1_entropy=float(p3.spearman_pc1_entropy[i]),
            manifold_features=f"standardised concatenated values (hook_v) at the final token, layer {p3.best_layer} (largest PC1+PC2)",
            attention_entropy=p3.attention_entropy.tolist(),
            attention_entropy_reduction=p3.attention_entropy_reduction,
            paper3=p3.summary(),
            paper3_per_layer=p3.to_dataframe().to_dict(orient="list"),
        )
        seqs = [tokenize_prompt(model, p) for p in read_prompts(args.prompts)]
    else:
        from ..analyses.features import collect_features, describe_features
        from ..analyses.manifold import ManifoldAccumulator

        g = torch.Generator().manual_seed(int(args.seed))
        n_pos = min(32, model.cfg.n_ctx)
        toks = torch.randint(0, model.cfg.d_vocab, (64, n_pos), generator=g)
        ko = key_orthogonality(model, definition="columns", seed=args.seed)
        _save_fig(ko, out, "key_orthogonality", figs)
        kind = args.features or "values_concat"
        feats = collect_features(model, toks, kind=kind, layer=-1, positions="last")
        with torch.no_grad():
            lp = torch.log_softmax(model(toks.to(model.cfg.device))[:, -1].double(), -1)
        h = -(lp.exp() * lp).sum(-1).cpu()
        acc = ManifoldAccumulator(standardize=True, feature_kind=describe_features(model, kind, -1, None), scalar_name="next-token entropy")
        acc.update(feats, h)
        m = acc.finalize()
        _save_fig(m, out, "value_manifold", figs)
        ent = attention_entropy(model, toks, positions="last")
        _save_fig(ent, out, "attention_entropy", figs)
        res.update(
            key_orthogonality=ko.per_layer.tolist(),
            key_orthogonality_definition="W_K columns per head, mean off-diagonal |cos| (Paper III)",
            key_orthogonality_random_init=ko.random_init_per_layer.tolist(),
            value_pc1=m.pc1_share,
            value_pc12=m.pc12_share,
            participation_ratio=m.participation_ratio,
            spearman_pc1_entropy=m.spearman_pc1,
            manifold_features=m.feature_kind,
            attention_entropy=ent.per_layer.tolist(),
            attention_entropy_reduction=ent.reduction,
        )
        seqs = [toks[i : i + 1] for i in range(toks.shape[0])]
    per_head: dict[str, list] = {}
    acc_res = []
    for s in seqs:
        if s.shape[1] < 4:
            continue
        acc_res.append(specialization(model, [(s, _position_groups(s.shape[1]))], n_groups=4))
    if acc_res:
        keys = acc_res[0].per_head().keys()
        for k in keys:
            vals = [r.per_head()[k] for r in acc_res]
            per_head[k] = {f: float(np.nanmean([v[f] for v in vals])) for f in vals[0]}
    res["specialization"] = per_head
    res["specialization_groups"] = "query position buckets (4 equal buckets per sequence), averaged over sequences"
    return res
