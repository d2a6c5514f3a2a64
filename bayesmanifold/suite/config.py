"""The geometry and dynamics suite behind ``analyze``, ``report`` and ``demo``: config, target, result.

On a wind-tunnel model: key orthogonality of the hypothesis-token keys, the value manifold at the
scored positions coloured by Bayes entropy, attention focusing, query–key alignment, value
specialization over position buckets and, where the checkpoint has a dynamics-monitor state or
weight snapshots, the frame/precision stabilisation steps. On any other model: Paper III's
protocol on prompts, or the same measures on random tokens. The measurements themselves are in
:mod:`.measure`; this module holds the values that go in and come out.

Example:
    >>> target = open_target("bijection-v20")  # doctest: +SKIP
    >>> res = run_suite(target, SuiteConfig(n_seqs=128))  # doctest: +SKIP
    >>> res.to_dataframe(); res.figure("value_manifold")  # doctest: +SKIP
"""

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from ..analyses.registry import figures
from ..errors import ConfigError, InputError
from ..models.target import Target

__all__ = ["FIGURES", "SuiteConfig", "SuiteResult", "Target", "has_exact_posterior"]

FEATURE_KINDS = ("residual", "values_concat", "head_outputs")
DYNAMICS_RANGES = ("first-stage", "all")


@dataclass(frozen=True, kw_only=True)
class SuiteConfig:
    """What the suite measures and on how much data.

    Attributes:
        seed: seed of the sampled sequences (wind tunnel), random tokens and baselines (>= 0).
        n_seqs: wind-tunnel sequences for the geometry (>= 8).
        features: representation of the value manifold: "residual", "values_concat" or
            "head_outputs" (None: the residual stream on wind tunnels, as Paper I's scripts;
            values_concat otherwise, as Paper III).
        prompts: a text file of prompts (one per line): Paper III's protocol instead of random tokens.
        dynamics: replay the training record (monitor state or weight snapshots) when there is one.
        max_snapshots: replay at most this many weight snapshots (>= 2).
        dynamics_range: "first-stage" (the from-scratch stage of a warm-started checkpoint) or "all".
    """

    seed: int = 0
    n_seqs: int = 256
    features: str | None = None
    prompts: str | None = None
    dynamics: bool = True
    max_snapshots: int = 40
    dynamics_range: str = "first-stage"

    def __post_init__(self) -> None:
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed < 2**32:
            raise ConfigError(f"seed must be an int in 0..2**32-1; got {self.seed!r}")
        if isinstance(self.n_seqs, bool) or not isinstance(self.n_seqs, int) or self.n_seqs < 8:
            raise ConfigError(f"n_seqs must be an int >= 8; got {self.n_seqs!r}")
        if self.features is not None and self.features not in FEATURE_KINDS:
            raise ConfigError(f"features must be one of {', '.join(FEATURE_KINDS)} or None; got {self.features!r}")
        if self.prompts is not None and not isinstance(self.prompts, str | Path):
            raise ConfigError(f"prompts must be a file path or None; got {type(self.prompts).__name__}")
        if isinstance(self.max_snapshots, bool) or not isinstance(self.max_snapshots, int) or self.max_snapshots < 2:
            raise ConfigError(f"max_snapshots must be an int >= 2; got {self.max_snapshots!r}")
        if self.dynamics_range not in DYNAMICS_RANGES:
            raise ConfigError(f"dynamics_range must be 'first-stage' or 'all'; got {self.dynamics_range!r}")
        if not isinstance(self.dynamics, bool):
            raise ConfigError(f"dynamics must be True or False; got {self.dynamics!r}")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["prompts"] = None if self.prompts is None else str(self.prompts)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "SuiteConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"unknown SuiteConfig fields {unknown}; known: {sorted(known)}")
        return cls(**d)


FIGURES = figures()  # figure name -> SuiteResult field, from the registry of measurements


@dataclass(frozen=True, eq=False)
class SuiteResult:
    """The suite's measurements: each analysis's result value, and the numbers as one JSON dict.

    Attributes:
        mode: "windtunnel", "prompts" or "random-tokens".
        numbers: the headline numbers (the ``analyze`` command's JSON).
        key_orthogonality, manifold, attention_entropy, specialization, dynamics, paper3: the
            analyses' results (None where not measured in this mode).
    """

    mode: str
    numbers: dict[str, Any]
    key_orthogonality: Any = None
    manifold: Any = None
    attention_entropy: Any = None
    specialization: Any = None
    dynamics: Any = None
    paper3: Any = None

    def to_dict(self) -> dict[str, Any]:
        """The numbers, JSON-safe (numpy and torch values converted)."""
        from ..io import _json_default

        return json.loads(json.dumps(self.numbers, default=_json_default))

    def to_dataframe(self):
        """One row per layer: key orthogonality, attention entropy (and query–key alignment)."""
        import pandas as pd

        n = self.numbers
        df = pd.DataFrame({"layer": range(len(n["key_orthogonality"])), "key_orthogonality": n["key_orthogonality"],
                           "attention_entropy": n["attention_entropy"]})
        if "query_key_alignment" in n:
            df["query_key_alignment"] = n["query_key_alignment"]
        return df

    def plot(self, ax=None):
        """Key orthogonality and attention entropy per layer on one axis."""
        import matplotlib.pyplot as plt

        if ax is None:
            _, ax = plt.subplots(figsize=(5, 3))
        df = self.to_dataframe()
        ax.plot(df["layer"], df["key_orthogonality"], "o-", label="key orthogonality")
        ax.plot(df["layer"], df["attention_entropy"], "s-", label="attention entropy (nats)")
        ax.set_xlabel("layer")
        ax.set_title(f"geometry suite ({self.mode})", fontsize=9)
        ax.legend(fontsize=8)
        return ax

    @property
    def figure_names(self) -> list[str]:
        """The figures this result can draw, in report order."""
        return [name for name, attr in FIGURES.items() if getattr(self, attr) is not None]

    def figure(self, name: str):
        """A new matplotlib Figure of the analysis ``name`` (see :attr:`figure_names`)."""
        if name not in self.figure_names:
            raise InputError(f"no figure {name!r} in this result; available: {self.figure_names}")
        ax = getattr(self, FIGURES[name]).plot()
        ax.figure.tight_layout()
        return ax.figure


def has_exact_posterior(task: Any) -> bool:
    """A wind tunnel with an exact Bayesian posterior (a text corpus task, which evaluates itself
    on held-out text instead, has none)."""
    return task is not None and not hasattr(task, "evaluate")
