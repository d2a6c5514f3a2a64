"""Paper II's EM-like vs SGD experiment on the sticky chain (arXiv 2512.22473, section 5.2).

Modules: :mod:`.config` (settings), :mod:`.kernel` (the hand-differentiated single head),
:mod:`.trainer` (batched training of many runs), :mod:`.result` (metrics and tables), :mod:`.run`
(the experiment and the whole reproduction), :mod:`.probes` (routing vs value dynamics through
capture) and :mod:`.deep` (the deep TransformerLens variant). The recorded full run ships beside
this package as ``bayesmanifold/experiments/em_vs_sgd_recorded.json``.

Example:
    >>> from bayesmanifold.experiments.em_vs_sgd import EMvsSGDConfig, run_em_vs_sgd
    >>> res = run_em_vs_sgd(EMvsSGDConfig(seeds=(42, 2024), steps=200, controls=False))  # doctest: +SKIP
    >>> print(res.table())  # doctest: +SKIP
"""

from .config import DEFAULT_SEEDS, EMvsSGDConfig, seeds_for
from .kernel import attention_forward_backward, init_weights, m_step_values
from .result import EMvsSGDResult, MethodResult
from .run import reproduce_em_vs_sgd, run_em_vs_sgd

__all__ = [
    "DEFAULT_SEEDS",
    "EMvsSGDConfig",
    "EMvsSGDResult",
    "MethodResult",
    "attention_forward_backward",
    "init_weights",
    "m_step_values",
    "reproduce_em_vs_sgd",
    "run_em_vs_sgd",
    "seeds_for",
]
