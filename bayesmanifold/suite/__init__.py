"""The geometry and dynamics suite: what ``analyze`` runs on a model, and what ``report`` and ``demo``
read (a :class:`SuiteConfig` in, a :class:`SuiteResult` out).

- :mod:`.config`: the config and result values;
- :mod:`.measure`: the measurements (key orthogonality, value manifold, attention focusing,
  query-key alignment, specialization; Paper III's protocol on prompts);
- :mod:`.dynamics`: the training record replayed (frame vs precision);
- :mod:`.run`: :func:`run_suite`.

Example:
    >>> from bayesmanifold.suite import SuiteConfig, run_suite
    >>> from bayesmanifold.models import open_target
    >>> res = run_suite(open_target("bijection-v20"), SuiteConfig(n_seqs=128))  # doctest: +SKIP
"""

from .config import FIGURES, SuiteConfig, SuiteResult, Target, has_exact_posterior
from .run import load_target, run_suite

__all__ = ["FIGURES", "SuiteConfig", "SuiteResult", "Target", "has_exact_posterior", "load_target", "run_suite"]
