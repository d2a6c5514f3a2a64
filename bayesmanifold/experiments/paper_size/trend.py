"""The size trend: the authors' value-manifold and focusing protocols (and ours) on models of increasing size.

Each entry is a checkpoint (a shipped name or a directory), optionally ``@STEP`` for one of its
weight snapshots, so that models of different sizes can be compared at the same training step.
Per entry: calibration (entropy MAE, mean KL), the authors' value manifold at the value positions
and at the prefix ends with the position control, the authors' focusing at the scored positions
(and at the last one), and our suite's value manifold (final-layer residual before the final norm).
"""

from dataclasses import dataclass
from typing import Any

__all__ = ["TrendResult", "size_trend", "parse_entry"]


def parse_entry(entry: str) -> tuple[str, int | None]:
    """``"name"`` or ``"name@step"`` -> (name, step or None)."""
    from ...errors import InputError

    name, sep, step = str(entry).rpartition("@")
    if not sep:
        return str(entry), None
    if not step.isdigit() or not name:
        raise InputError(f"a trend entry is CHECKPOINT or CHECKPOINT@STEP; got {entry!r}")
    return name, int(step)


@dataclass(frozen=True)
class TrendResult:
    """One row of numbers per (checkpoint, step)."""

    rows: list

    def to_dict(self) -> dict[str, Any]:
        return {"rows": list(self.rows)}

    def to_dataframe(self):
        import pandas as pd

        return pd.DataFrame(self.rows)

    def plot(self, ax=None):
        """PC1 share (authors' protocol, value positions) and focusing against parameters."""
        import matplotlib.pyplot as plt

        if ax is None:
            _, ax = plt.subplots(figsize=(5, 3.2))
        df = self.to_dataframe()
        ax.semilogx(df["params"], df["authors_pc1_values"], "o", label="PC1 share, value positions (authors)")
        ax.semilogx(df["params"], df["authors_focusing"], "s", label="focusing reduction (authors)")
        ax.axhspan(0.84, 0.90, color="C2", alpha=0.15, label="paper (PC1 84–90%, focusing 85–90%)")
        ax.set_xlabel("parameters")
        ax.set_ylim(0, 1)
        ax.legend(fontsize=7)
        ax.set_title("size trend", fontsize=9)
        return ax


def size_trend(entries: list[str], *, n_seqs: int = 3200, suite_seqs: int = 512, calib_seqs: int = 512, seed: int = 0) -> TrendResult:
    """Measure every entry (see the module docstring); models are loaded one at a time on the CPU."""
    from ...analyses.protocols import ProtocolConfig, measure_protocols
    from ...models.checkpoint import load_checkpoint, resolve_checkpoint
    from ...models.presets import count_params
    from ...models.snapshots import load_snapshot
    from ...suite import SuiteConfig, Target, run_suite
    from ...windtunnels.calibration import measure_calibration

    rows = []
    for entry in entries:
        name, step = parse_entry(entry)
        model, task, cfg, history = load_checkpoint(name)
        if step is not None:
            model = load_snapshot(name, step)
        else:
            step = int(cfg.get("step_offset", 0)) + int(cfg.get("step", 0))
        cal = measure_calibration(model, task, n_seqs=calib_seqs, generator=12345)
        proto = measure_protocols(model, task, ProtocolConfig(n_seqs=n_seqs, seed=seed)).to_dict()
        ours = run_suite(Target(model, task, cfg, {}, resolve_checkpoint(name)),
                         SuiteConfig(n_seqs=suite_seqs, seed=seed, dynamics=False)).to_dict()
        vm, af = proto["value_manifold"], proto["attention_focusing"]
        vals = vm.get("value_positions") or vm["prefix_last"]
        main = next(k for k in af if not k.endswith("_final"))
        m = cfg["model"]
        rows.append({
            "checkpoint": name, "step": step, "shape": f"{m['n_layers']}L×{m['n_heads']}H d{m['d_model']}",
            "params": count_params(model), "preset": cfg.get("preset"),
            "entropy_mae_bits": cal.entropy_mae_bits, "mean_kl_bits": cal.mean_kl_bits,
            "authors_pc1_values": vals["pc1_share"], "authors_pc12_values": vals["pc12_share"],
            "authors_best_abs_r_values": abs(vals["best_pearson"]), "authors_best_pc_values": vals["best_pc"],
            "position_share_values": vals["position_share"], "within_pc1_values": vals["within_pc1_share"],
            "authors_pc1_prefix": vm["prefix_last"]["pc1_share"],
            "authors_abs_rho_prefix": abs(vm["prefix_last"]["spearman_pc1"]),
            "pc1_position_r2_prefix": vm["prefix_last"]["pc1_position_r2"],
            "within_pc1_prefix": vm["prefix_last"]["within_pc1_share"],
            "authors_focusing": af[main]["reduction"], "authors_focusing_last": af[f"{main}_final"]["reduction"],
            "authors_focusing_to_min_layer": af[main]["reduction_to_min_layer"],
            "ours_pc1": ours["value_pc1"], "ours_abs_rho": abs(ours["spearman_pc1_entropy"]),
            "ours_focusing": ours["attention_entropy_reduction"],
        })
    return TrendResult(rows)
