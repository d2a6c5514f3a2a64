"""The demo: the papers' claims tested on our trained bijection model, Paper II's EM-vs-SGD run and a pretrained LLM.

One call of the report (:func:`bayesmanifold.report.build_report`) with the demo's settings: the
shipped ``bijection-v20`` checkpoint and the live EM-like vs SGD experiment beside the recorded
full run with its controls.

Example:
    >>> from bayesmanifold.demo import run_demo
    >>> path, summary = run_demo(out="report", quick=True)  # doctest: +SKIP
"""

from pathlib import Path
from typing import Any

from .report import ReportConfig, build_report

__all__ = ["DEMO_CHECKPOINT", "demo_config", "run_demo"]

DEMO_CHECKPOINT = "bijection-v20"


def demo_config(
    *,
    out: str = "report",
    checkpoint: str = DEMO_CHECKPOINT,
    device: str = "cpu",
    seed: int = 0,
    quick: bool = False,
    progress: bool = True,
) -> ReportConfig:
    """The demo's report settings: ``checkpoint`` with the EM-vs-SGD experiment, the recorded
    induction-head dynamics of the real-text model and the pretrained LLM SmolLM2-135M."""
    return ReportConfig(target=checkpoint, out=out, device=device, seed=seed, quick=quick, em_vs_sgd=True,
                        induction=True, pretrained=True, progress=progress)


def run_demo(**kwargs: Any) -> tuple[Path, dict[str, Any]]:
    """Build the demo report (keyword arguments as :func:`demo_config`); ``(directory, summary)``."""
    return build_report(demo_config(**kwargs))
