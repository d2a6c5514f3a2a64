"""``bayesmanifold calibrate``: entropy-calibration MAE and KL of a checkpoint (Paper I, §4)."""

import json

from ..errors import ConfigError
from ..io import atomic_write_json
from .common import add_device_arg, add_json_arg, add_seed_arg, at_least, check_writable_dir

NAME = "calibrate"
HELP = "measure a checkpoint's entropy-calibration MAE and per-position KL against Bayes"
EXAMPLE = "bayesmanifold calibrate hmm-k20 --k 50 --n-seqs 1000 --json hmm_k50.json"


def add_arguments(parser) -> None:
    parser.add_argument("checkpoint", help="checkpoint directory or shipped name (see `checkpoints`)")
    parser.add_argument("--n-seqs", type=at_least(1), default=1000, help="evaluation sequences")
    parser.add_argument("--k", type=at_least(1), default=None,
                        help="HMM only: number of observations (length generalisation, e.g. 30, 50)")
    add_seed_arg(parser, default=12345, help="seed of the evaluation sequences")
    parser.add_argument("--batch-size", type=at_least(1), default=256)
    parser.add_argument("--logit-lens", action="store_true",
                        help="also report the per-layer logit-lens KL (transformers)")
    add_device_arg(parser)
    add_json_arg(parser)
    parser.add_argument("--record", action="store_true",
                        help="write metrics.json into the checkpoint directory (not a shipped one; refused if it exists "
                        "unless --overwrite): this measurement, "
                        "a quick one (--quick-n-seqs) that tests re-measure, and for HMM the K=30 "
                        "and K=50 length generalisation")
    parser.add_argument("--quick-n-seqs", type=at_least(1), default=200)
    parser.add_argument("--overwrite", action="store_true",
                        help="with --record: replace the metrics.json the checkpoint directory holds (never a shipped "
                        "checkpoint's: the installed package is not written)")


def check_record(checkpoint: str, overwrite: bool) -> None:
    """``--record`` writes metrics.json into the checkpoint directory: never into the installed
    package (a shipped checkpoint's recorded measurement), never over an existing one unless
    ``overwrite``; the directory must be writable. Checked before measuring."""
    from ..models.checkpoint import METRICS, resolve_checkpoint, shipped_dir

    d = resolve_checkpoint(checkpoint).resolve()
    if d.is_relative_to(shipped_dir().resolve()):
        raise ConfigError(f"--record: {checkpoint!r} is a checkpoint shipped inside the installed package; its recorded "
                          f"{METRICS} is not rewritten. Copy the directory ({str(d)!r}) elsewhere and record there, or use --json")
    if (d / METRICS).is_file() and not overwrite:
        raise ConfigError(f"--record: {str(d / METRICS)!r} exists (a recorded measurement); pass --overwrite to replace it, "
                          "or use --json")
    check_writable_dir(d, METRICS, "--record")


def run(args) -> int:
    from ..analyses.logit_lens import logit_lens_kl
    from ..models.checkpoint import load_checkpoint, refuse_unusable
    from ..windtunnels.calibration import calibration_from_probs, measure_calibration

    device = args.device
    refuse_unusable(args.checkpoint, command="calibration", exact_posterior=True)
    if args.overwrite and not args.record:
        raise ConfigError("--overwrite applies to --record only (it replaces the checkpoint's metrics.json)")
    if args.record:
        if args.k is not None:
            raise ConfigError("--record measures the trained length; do not combine it with --k")
        check_record(args.checkpoint, args.overwrite)  # metrics.json: checked before measuring
    model, task, cfg, _ = load_checkpoint(args.checkpoint, device=device)
    if args.k is not None:
        if task.NAME != "hmm":
            raise ConfigError(f"--k applies to HMM checkpoints only; this one is {task.NAME!r}")
        n_ctx = cfg["model"]["n_ctx"]
        new = task.with_K(args.k)
        if new.seq_len > n_ctx:
            kmax = (n_ctx - task.header_len) // 2
            raise ConfigError(f"--k {args.k} needs {new.seq_len} positions; the model has n_ctx="
                              f"{n_ctx} (K <= {kmax})")
        task = new
    res = measure_calibration(model, task, n_seqs=args.n_seqs, generator=args.seed,
                              batch_size=args.batch_size, device=device)
    out = {
        "checkpoint": str(args.checkpoint),
        "task": task.NAME,
        "task_params": task.to_dict(),
        "arch": cfg["arch"],
        "preset": cfg.get("preset"),
        "n_params": cfg.get("n_params"),
        "steps": cfg.get("step"),
        "n_seqs": res.n_seqs,
        "seed": args.seed,
        "entropy_mae_bits": res.entropy_mae_bits,
        "mean_kl_bits": res.mean_kl_bits,
        "kl_bits": res.kl_bits.tolist(),
        "model_entropy_bits": res.model_entropy_bits.tolist(),
        "bayes_entropy_bits": res.bayes_entropy_bits.tolist(),
    }
    if task.NAME == "hmm":
        # references: exact filters that see only the last w observations (w = 1 ignores T)
        b = task.sample(min(args.n_seqs, 1000), generator=args.seed)
        out["window_filter_kl_bits"] = {
            str(w): calibration_from_probs(task.window_posterior(b.tokens, w).clamp_min(1e-300).log(),
                                           b.posterior).mean_kl_bits
            for w in (1, 2, 3)
        }
    if args.logit_lens:
        if cfg["arch"] != "transformer":
            raise ConfigError("--logit-lens needs a transformer checkpoint")
        ll = logit_lens_kl(model, task, n_seqs=min(args.n_seqs, 512), generator=args.seed)
        out["logit_lens_kl_bits"] = dict(zip(ll.layers, ll.kl_bits.tolist()))
    if args.json:
        atomic_write_json(args.json, out)
    if args.record:
        _record(args, model, task, cfg, out, device)
    print(f"{cfg['arch']} on {task.NAME} {task.to_dict()}: entropy MAE {res.entropy_mae_bits:.5f} "
          f"bits, mean KL {res.mean_kl_bits:.5f} bits (n_seqs={res.n_seqs})")
    if "window_filter_kl_bits" in out:
        refs = ", ".join(f"last {w}: {v:.5f}" for w, v in out["window_filter_kl_bits"].items())
        print(f"reference: mean KL of exact filters that see only the last w observations ({refs}) bits")
    if args.logit_lens:
        print("logit-lens KL (bits): " + json.dumps(out["logit_lens_kl_bits"]))
    return 0


def _record(args, model, task, cfg, out, device) -> None:
    """metrics.json beside the weights: full, quick and (HMM) length-generalisation numbers."""
    from pathlib import Path

    from ..models.checkpoint import resolve_checkpoint
    from ..windtunnels.calibration import measure_calibration

    quick = measure_calibration(model, task, n_seqs=args.quick_n_seqs, generator=args.seed,
                                batch_size=args.batch_size, device=device)
    rec = dict(out)
    rec["quick"] = {"n_seqs": quick.n_seqs, "seed": args.seed,
                    "entropy_mae_bits": quick.entropy_mae_bits, "mean_kl_bits": quick.mean_kl_bits}
    if task.NAME == "hmm":
        rec["length_generalisation"] = {}
        for k in (30, 50):
            t = task.with_K(k)
            if t.seq_len > cfg["model"]["n_ctx"]:
                continue
            r = measure_calibration(model, t, n_seqs=args.n_seqs, generator=args.seed,
                                    batch_size=args.batch_size, device=device)
            rec["length_generalisation"][f"K={k}"] = {
                "entropy_mae_bits": r.entropy_mae_bits, "mean_kl_bits": r.mean_kl_bits,
                "n_seqs": r.n_seqs}
            print(f"  K={k}: entropy MAE {r.entropy_mae_bits:.5f} bits, mean KL "
                  f"{r.mean_kl_bits:.5f} bits")
    atomic_write_json(Path(resolve_checkpoint(args.checkpoint)) / "metrics.json", rec)
