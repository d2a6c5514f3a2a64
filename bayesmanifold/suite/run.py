"""Running the suite: :func:`run_suite` measures a :class:`~bayesmanifold.models.Target` as a
:class:`SuiteConfig` says (the wind-tunnel suite, or the text suite on prompts or random tokens)."""

from ..backends import model_access
from ..models.target import Target, open_target
from . import measure
from .config import SuiteConfig, SuiteResult, has_exact_posterior

__all__ = ["load_target", "run_suite"]


def load_target(spec: str, *, task: str | None = None, device: str = "cpu", dtype: str = "float32",
                seed: int = 0, tokenizer: str | None = None) -> Target:
    """:func:`bayesmanifold.models.open_target` (kept under this name for the suite's callers)."""
    return open_target(spec, task=task, device=device, dtype=dtype, seed=seed, tokenizer=tokenizer)


def run_suite(target: Target, config: SuiteConfig) -> SuiteResult:
    """Measure ``target`` as ``config`` says: the wind-tunnel suite when it has a task and no
    prompts were given, else the text suite (prompts or random tokens)."""
    model_access(target.model)  # refuses a model no backend handles (LSTM, MLP baselines) before any work
    if has_exact_posterior(target.task) and not config.prompts:
        return measure.windtunnel_suite(target, config)
    return measure.text_suite(target.model, config)
