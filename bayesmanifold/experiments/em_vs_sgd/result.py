"""Result values of the EM-like vs SGD experiment: one :class:`MethodResult` per method and the
whole table as :class:`EMvsSGDResult`.

Metrics (as the released script): the final loss is evaluated after the last update; the
threshold is the mean final SGD loss; a run "reaches" it at the first step ``k`` whose loss
*before* update ``k`` is below it (``steps`` if never: censored, counted in ``n_reached``);
speed-up = ``steps / mean(first step)``; standard deviations are over seeds with ``ddof=0``;
the paired t-test of final losses (EM-like vs SGD) uses ``scipy.stats.ttest_rel`` (scipy is a
dependency of scikit-learn, so nothing is added to the requirements).
"""

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .config import N_STATES, EMvsSGDConfig
from .trainer import RunOut, RunSpec

__all__ = ["MethodResult", "EMvsSGDResult"]


def _first_below(curve: np.ndarray, threshold: float, steps: int) -> tuple[int, bool]:
    below = np.nonzero(curve < threshold)[0]
    if below.size == 0:
        return steps, False
    return int(min(below[0], steps)), True


@dataclass(frozen=True, eq=False)
class MethodResult:
    """One training method over the seeds.

    Attributes:
        name: method key (``sgd``, ``em_like``, ``sgd_lr0.1``, ``adam``, ``m_step``, ...).
        description: what the method is, with its learning rates.
        seeds: the seeds, in the order of the arrays.
        final_loss, entropy, accuracy: ``[seeds]`` after the last step (loss and entropy in nats).
        test_loss, test_entropy: ``[seeds]`` the final weights on a fresh sequence of the same
            chain (sequence seed + 10000): a training loss below ``H_min`` is memorisation.
        curves: ``[seeds, steps + 1]`` loss before each update, then the final loss.
        threshold: the loss level used for ``steps_to_threshold`` (mean final loss of the SGD run
            on the same chain).
        steps_to_threshold: ``[seeds]`` first step below ``threshold`` (``steps`` if never).
        reached: ``[seeds]`` whether the threshold was reached.
        h_min_nats: entropy rate of the chain the method trained on.
    """

    name: str
    description: str
    seeds: tuple[int, ...]
    final_loss: np.ndarray
    entropy: np.ndarray
    accuracy: np.ndarray
    curves: np.ndarray
    threshold: float
    steps_to_threshold: np.ndarray
    reached: np.ndarray
    h_min_nats: float
    test_loss: np.ndarray
    test_entropy: np.ndarray

    @property
    def steps_mean(self) -> float:
        return float(np.mean(self.steps_to_threshold))

    def summary(self) -> dict[str, Any]:
        """JSON-ready summary (means and ddof=0 standard deviations over seeds)."""
        ln2 = math.log(2.0)
        return {
            "description": self.description,
            "final_loss_mean": float(np.mean(self.final_loss)),
            "final_loss_std": float(np.std(self.final_loss)),
            "entropy_mean": float(np.mean(self.entropy)),
            "entropy_std": float(np.std(self.entropy)),
            "entropy_bits_mean": float(np.mean(self.entropy) / ln2),
            "accuracy_mean": float(np.mean(self.accuracy)),
            "accuracy_std": float(np.std(self.accuracy)),
            "gap_to_h_min_nats": float(np.mean(self.final_loss) - self.h_min_nats),
            "test_loss_mean": float(np.mean(self.test_loss)),
            "test_loss_std": float(np.std(self.test_loss)),
            "test_entropy_mean": float(np.mean(self.test_entropy)),
            "h_min_nats": self.h_min_nats,
            "threshold": self.threshold,
            "steps_to_sgd_final_mean": self.steps_mean,
            "steps_to_sgd_final_std": float(np.std(self.steps_to_threshold)),
            "n_reached": int(np.sum(self.reached)),
            "per_seed": {
                str(s): {
                    "final_loss": float(fl),
                    "entropy": float(e),
                    "accuracy": float(a),
                    "steps_to_sgd_final": int(st),
                    "test_loss": float(tl),
                }
                for s, fl, e, a, st, tl in zip(
                    self.seeds, self.final_loss, self.entropy, self.accuracy, self.steps_to_threshold, self.test_loss
                )
            },
        }

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe: the :meth:`summary`."""
        return self.summary()

    def to_dataframe(self):
        """Tidy table: one row per seed."""
        import pandas as pd

        return pd.DataFrame([
            {
                "method": self.name,
                "seed": s,
                "final_loss": float(self.final_loss[i]),
                "entropy_nats": float(self.entropy[i]),
                "accuracy": float(self.accuracy[i]),
                "steps_to_sgd_final": int(self.steps_to_threshold[i]),
                "reached": bool(self.reached[i]),
                "test_loss": float(self.test_loss[i]),
                "h_min_nats": self.h_min_nats,
            }
            for i, s in enumerate(self.seeds)
        ])

    def plot(self, ax=None):
        """The mean loss curve over seeds (± std), labelled with its final value."""
        import matplotlib.pyplot as plt

        if ax is None:
            _, ax = plt.subplots(figsize=(8, 5))
        mean, std = self.curves.mean(0), self.curves.std(0)
        x = np.arange(mean.size)
        (line,) = ax.plot(x, mean, label=f"{self.name} ({mean[-1]:.3f})")
        ax.fill_between(x, mean - std, mean + std, alpha=0.15, color=line.get_color())
        ax.set_xlabel("step")
        ax.set_ylabel("cross-entropy (nats)")
        return ax


@dataclass(frozen=True, eq=False)
class EMvsSGDResult:
    """The experiment's numbers. ``to_dict()`` is what ``--json`` writes.

    Attributes:
        config: the configuration that produced it.
        h_min_nats, h_min_bits: entropy rate of the (0.3498-effective) chain.
        sgd, em_like: the two headline methods.
        controls: ``{name: MethodResult}`` (empty without controls).
        steps_to_sgd_final: ``[seeds]`` first step at which EM-like is below the mean final SGD loss.
        speedup: ``steps / mean(steps_to_sgd_final)``.
        t_stat, p_value: paired t-test of final losses, EM-like vs SGD (NaN with one seed).
        adam_grid: ``{lr: held-out loss after training on tune_seed}``; adam_lr the chosen one.
        wall_s: wall time of the whole experiment; ms_per_model_step: training wall time per
            model-step (one full-batch step of one run), with ``extras["train_workers"]`` processes.
        snapshots: ``{method: [(step, (W_Q, W_K, W_V, W_O))]}`` for the probe seed (optional).
        data: the chain samples used, by ``(sequence seed, literal)``.
    """

    config: EMvsSGDConfig
    h_min_nats: float
    h_min_bits: float
    sgd: MethodResult
    em_like: MethodResult
    controls: dict[str, MethodResult]
    steps_to_sgd_final: np.ndarray
    speedup: float
    t_stat: float
    p_value: float
    adam_grid: dict[float, float]
    adam_lr: float | None
    wall_s: float
    ms_per_model_step: float
    snapshots: dict[str, list] = field(default_factory=dict, repr=False)
    data: dict = field(default_factory=dict, repr=False)
    extras: dict[str, Any] = field(default_factory=dict)

    def methods(self) -> dict[str, MethodResult]:
        return {"sgd": self.sgd, "em_like": self.em_like, **self.controls}

    def fastest(self, *, generalising: bool = False) -> str:
        """The method (on the 0.3498 chain) with the fewest mean steps to the SGD level.

        Args:
            generalising: only methods whose held-out loss is no worse than SGD's (a method that
                drives the training loss down by memorising the one sequence is left out).
        """
        cands = {k: m for k, m in self.methods().items() if not k.endswith("_s0.3")}
        if generalising:
            ref = float(np.mean(self.sgd.test_loss))
            cands = {k: m for k, m in cands.items() if float(np.mean(m.test_loss)) <= ref}
        return min(cands, key=lambda k: (cands[k].steps_mean, float(np.mean(cands[k].final_loss))))

    def to_dict(self) -> dict[str, Any]:
        def nan_none(v: float) -> float | None:
            return None if v is None or not math.isfinite(v) else float(v)

        out = {
            "experiment": "em-vs-sgd",
            "paper": "arXiv 2512.22473 section 5.2 (sticky Markov chain)",
            "config": self.config.to_dict(),
            "h_min_nats": self.h_min_nats,
            "h_min_bits": self.h_min_bits,
            "uniform_nats": math.log(N_STATES),
            "sgd": self.sgd.summary(),
            "em_like": self.em_like.summary(),
            "steps_to_sgd_final_mean": float(np.mean(self.steps_to_sgd_final)),
            "steps_to_sgd_final_std": float(np.std(self.steps_to_sgd_final)),
            "steps_to_sgd_final": [int(s) for s in self.steps_to_sgd_final],
            "speedup": nan_none(self.speedup),
            "t_stat": nan_none(self.t_stat),
            "p_value": nan_none(self.p_value),
            "p_value_test": "paired t-test of final losses, EM-like vs SGD (scipy.stats.ttest_rel)",
            "controls": {k: m.summary() for k, m in self.controls.items()},
            "adam_grid": {str(k): v for k, v in self.adam_grid.items()},
            "adam_lr": self.adam_lr,
            "fastest": self.fastest(),
            "fastest_generalising": self.fastest(generalising=True),
            "wall_s": self.wall_s,
            "ms_per_model_step": self.ms_per_model_step,
        }
        out.update(self.extras)
        return out

    def to_dataframe(self):
        """Tidy table: one row per method and seed."""
        import pandas as pd

        return pd.concat([m.to_dataframe() for m in self.methods().values()], ignore_index=True)

    def table(self) -> str:
        """A fixed-width text table of every method (the command line prints it)."""
        ln2 = math.log(2.0)
        steps = self.config.steps
        lines = [
            f"EM-like vs SGD on the sticky chain ({plural(len(self.config.seeds), 'seed')}, {plural(steps, 'step')}); "
            f"H_min = {self.h_min_nats:.4f} nats = {self.h_min_bits:.3f} bits",
            f"{'method':<14} {'final loss (nats)':>19} {'entropy nats/bits':>19} {'accuracy':>9} "
            f"{'steps to SGD final':>19} {'speed-up':>8} {'held-out loss':>16}",
        ]
        for name, m in self.methods().items():
            s = m.summary()
            st = m.steps_to_threshold
            reached = f"{np.mean(st):.0f} ± {np.std(st):.0f}"
            if not m.reached.all():
                reached += f" ({int(m.reached.sum())}/{len(st)})"
            sp = steps / max(np.mean(st), 1e-9)
            lines.append(
                f"{name:<14} {s['final_loss_mean']:>10.4f} ± {s['final_loss_std']:.4f} "
                f"{s['entropy_mean']:>9.4f} / {s['entropy_mean'] / ln2:.3f} {s['accuracy_mean']:>9.4f} "
                f"{reached:>19} {sp:>7.2f}× {s['test_loss_mean']:>8.4f} ± {s['test_loss_std']:.4f}"
            )
        lines.append(
            f"EM-like reaches the mean final SGD loss ({self.sgd.summary()['final_loss_mean']:.4f}) at "
            f"{np.mean(self.steps_to_sgd_final):.0f} ± {np.std(self.steps_to_sgd_final):.0f} steps: "
            f"speed-up {self.speedup:.2f}×; " + p_value_text(self.p_value, len(self.config.seeds), "{:.4g}")
        )
        if self.adam_lr is not None:
            grid = ", ".join(f"{k:g}: {v:.4f}" for k, v in self.adam_grid.items())
            lines.append(
                f"Adam lr tuned by held-out loss on seed {self.config.tune_seed} over {{{grid}}} -> {self.adam_lr:g}"
            )
        lines.append(
            f"Fastest to the SGD level: {self.fastest()}; among methods whose held-out loss is no worse "
            f"than SGD's: {self.fastest(generalising=True)}"
        )
        lines.append(f"wall {self.wall_s:.1f} s; {self.ms_per_model_step:.2f} ms per model-step")
        return "\n".join(lines)

    def plot(self, ax=None, *, methods: Sequence[str] | None = None):
        """Mean loss curves (± std over seeds) with the H_min line."""
        import matplotlib.pyplot as plt

        if ax is None:
            _, ax = plt.subplots(figsize=(8, 5))
        ms = self.methods()
        names = list(methods) if methods is not None else [k for k in ms if not k.endswith("_s0.3")]
        for name in names:
            ms[name].plot(ax)
        ax.axhline(self.h_min_nats, color="k", ls="--", lw=1, label=f"H_min = {self.h_min_nats:.4f} nats")
        ax.axhline(self.sgd.threshold, color="grey", ls=":", lw=1, label="mean final SGD loss")
        ax.set_xlabel("step")
        ax.set_ylabel("cross-entropy (nats)")
        ax.set_title("Sticky chain: EM-like vs SGD and controls")
        ax.legend(fontsize=8)
        return ax


def paired_t(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    if len(a) < 2 or np.allclose(a, b, rtol=0, atol=0):
        return float("nan"), float("nan")
    from scipy import stats  # scipy ships with scikit-learn

    r = stats.ttest_rel(a, b)
    return float(r.statistic), float(r.pvalue)


def method_result(
    name: str,
    desc: str,
    specs: list[RunSpec],
    out: RunOut,
    rows: list[int],
    threshold: float,
    h_min: float,
    steps: int,
    test: list[np.ndarray],
) -> MethodResult:
    """Gather the rows of one method from a batched training into a :class:`MethodResult`."""
    idx = np.array(rows)
    curves = out.curves[idx]
    st, re = zip(*(_first_below(c, threshold, steps) for c in curves))
    return MethodResult(
        name=name,
        description=desc,
        seeds=tuple(specs[i].seed for i in rows),
        final_loss=out.final_loss[idx],
        entropy=out.entropy[idx],
        accuracy=out.accuracy[idx],
        curves=curves,
        threshold=float(threshold),
        steps_to_threshold=np.array(st),
        reached=np.array(re),
        h_min_nats=h_min,
        test_loss=test[0][idx],
        test_entropy=test[1][idx],
    )



def plural(n: int, word: str) -> str:
    """``1 seed``, ``2 seeds``."""
    return f"{n} {word}{'' if n == 1 else 's'}"


def p_value_text(p: float | None, n_seeds: int, fmt: str = "{:.3g}") -> str:
    """``paired t-test p = …``, or why there is none (a t-test over one seed has no variance)."""
    if p is None or p != p:
        return f"paired t-test: no p-value ({plural(n_seeds, 'seed')}: a t-test needs at least 2 with varying differences)"
    return "paired t-test p = " + fmt.format(p)
