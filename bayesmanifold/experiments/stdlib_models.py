"""The stdlib models (``stdlib-attn2``: BPE; ``stdlib-mlp2``: bytes): what ships in ``metrics.json``.

:func:`checkpoint_metrics` measures a finished text checkpoint: its held-out loss (the training
run's evaluation, ``n_eval`` windows, and a tiny 8-window evaluation the tests re-measure), the
induction score of every head (:func:`bayesmanifold.analyses.induction_scores` on 16 repeated
random sequences of 2 × 48 tokens, seed 0: printable ASCII for a byte-level model, every ordinary
token of a BPE model) at every weight snapshot, and per head
the step at which its score rose: the first snapshot whose score exceeds half of the head's
maximum over training, for heads whose maximum reaches ``rise_factor`` (default 10) times the
probe's uniform level (else None). The uniform level is the score of a head that spreads its
attention evenly over the keys it may see: the mean of 1/(half + t + 1) over the second-copy
queries t = 0..half−1 (0.0143 for half = 48), so a head counted as an induction head puts at least
ten times its even share on the one target key.
"""

import json
from pathlib import Path
from typing import Any

import numpy as np

from ..analyses.induction import induction_scores, ordinary_ids
from ..backends import model_access
from ..io import atomic_write_json
from ..models.checkpoint import load_checkpoint, resolve_checkpoint
from ..models.snapshots import list_snapshots, load_snapshot

__all__ = ["checkpoint_metrics", "write_metrics", "rise_step", "uniform_level", "plot_loss_curves", "TINY_WINDOWS",
           "TINY_SEQS"]

TINY_WINDOWS = 8  # held-out windows of the tiny evaluation the tests repeat
TINY_SEQS = 4  # repeated sequences of the tiny induction measurement the tests repeat


def rise_step(steps: list[int], scores: np.ndarray, rise_min: float = 0.2) -> int | None:
    """First step whose score exceeds half the maximum (None if the maximum stays below rise_min)."""
    top = float(np.max(scores))
    if top < rise_min:
        return None
    return int(next(s for s, v in zip(steps, scores) if v > 0.5 * top))


def uniform_level(half: int) -> float:
    """The induction score of even attention over the visible keys (see the module doc)."""
    return float(np.mean([1.0 / (half + t + 1) for t in range(half)]))


def checkpoint_metrics(checkpoint: str | Path, *, n_seqs: int = 16, half: int = 48, seed: int = 0,
                       rise_factor: float = 10.0) -> dict[str, Any]:
    """Held-out loss and induction scores (per snapshot) of a finished text checkpoint."""
    rise_min = rise_factor * uniform_level(half)
    model, task, cfg, history = load_checkpoint(checkpoint)
    n_eval = int(cfg["train"]["n_eval"])
    full = task.evaluate(model, n=n_eval)
    tiny = task.evaluate(model, n=TINY_WINDOWS)
    final = induction_scores(model, n_seqs=n_seqs, half=half, seed=seed)
    tiny_ind = induction_scores(model, n_seqs=TINY_SEQS, half=half, seed=seed)
    steps, per_snap = [], []
    for step, _ in list_snapshots(checkpoint):
        r = induction_scores(load_snapshot(checkpoint, step), n_seqs=n_seqs, half=half, seed=seed)
        steps.append(step)
        per_snap.append(r.score)
    per_snap = np.array(per_snap)  # [snapshot, head]
    heads = []
    for k, (layer, head) in enumerate(final.heads):
        heads.append({"layer": layer, "head": head, "induction_score": float(final.score[k]),
                      "prev_token_score": float(final.prev_token[k]),
                      "max_over_snapshots": float(per_snap[:, k].max()) if len(steps) else None,
                      "rise_step": rise_step(steps, per_snap[:, k], rise_min) if len(steps) else None})
    corpus = Path(resolve_checkpoint(checkpoint)) / "corpus.json"
    lo, hi = ordinary_ids(model_access(model))
    alphabet = "printable ASCII 32..126" if (lo, hi) == (32, 127) else f"token ids {lo}..{hi - 1}"
    per_byte = {k: full[k] for k in ("heldout_loss_per_byte", "bytes_per_token") if k in full}
    return {
        "kind": "text",
        "heldout_loss": full["heldout_loss"],
        "heldout_bits_per_byte": full["heldout_bits_per_byte"],
        **per_byte,
        "n_heldout_windows": full["n_heldout_windows"],
        "heldout_loss_tiny": tiny["heldout_loss"],
        "n_tiny_windows": tiny["n_heldout_windows"],
        "corpus_sha256": json.loads(corpus.read_text())["sha256"] if corpus.is_file() else None,
        "induction_probe": {"n_seqs": n_seqs, "half": half, "seed": seed, "alphabet": alphabet,
                            "uniform_level": uniform_level(half),
                            "rise_rule": f"first snapshot above half the head's maximum, if the maximum >= {rise_factor:g} x "
                                         f"the uniform level = {rise_min:.4f}"},
        "heads": heads,
        "induction_tiny": {"n_seqs": TINY_SEQS, "scores": [float(x) for x in tiny_ind.score]},
        "snapshot_steps": steps,
        "induction_per_snapshot": per_snap.tolist(),
        "train_wall_time_s": history.get("wall_time_s"),
    }


def write_metrics(checkpoint: str | Path, **kwargs: Any) -> dict[str, Any]:
    """Measure and write ``<checkpoint>/metrics.json``."""
    m = checkpoint_metrics(checkpoint, **kwargs)
    atomic_write_json(Path(resolve_checkpoint(checkpoint)) / "metrics.json", m)
    return m


def plot_loss_curves(checkpoints: list[str | Path], out: str | Path) -> Path:
    """One figure of the training loss (thin) and held-out loss (points) of text checkpoints, in
    nats per token of each model's own vocabulary and, on the right, per byte; written atomically."""
    from matplotlib.figure import Figure

    from ..io import atomic_write

    fig = Figure(figsize=(10, 3.4))
    ax_tok, ax_byte = fig.subplots(1, 2)
    for ck in checkpoints:
        d = Path(resolve_checkpoint(ck))
        hist = json.loads((d / "history.json").read_text(encoding="utf-8"))
        corpus = json.loads((d / "corpus.json").read_text(encoding="utf-8")) if (d / "corpus.json").is_file() else {}
        bpt = corpus.get("n_heldout_bytes", 1) / corpus.get("n_heldout_tokens", corpus.get("n_heldout_bytes", 1))
        name = Path(ck).name
        loss = np.array(hist["loss"], dtype=float)
        ev = [(e["step"], e["heldout_loss"]) for e in hist["eval"] if "heldout_loss" in e]
        for ax, scale in ((ax_tok, 1.0), (ax_byte, 1.0 / bpt)):
            (line,) = ax.plot(loss[:, 0], loss[:, 1] * scale, lw=0.6, alpha=0.5)
            if ev:
                ax.plot([s for s, _ in ev], [v * scale for _, v in ev], "o-", ms=3, color=line.get_color(),
                        label=f"{name} (held out)")
    for ax, unit in ((ax_tok, "nats per token"), (ax_byte, "nats per byte (held-out bytes/token)")):
        ax.set_xscale("log")
        ax.set_xlabel("step")
        ax.set_ylabel(unit)
        ax.legend(fontsize=7)
    fig.tight_layout()
    return atomic_write(Path(out), lambda tmp: fig.savefig(tmp, dpi=130, format="png"))
