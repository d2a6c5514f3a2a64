"""bayesmanifold: measure the gradient dynamics of attention on TransformerLens models.

Capture, per head, the attention pattern, the values and the upstream gradient in one
forward+backward pass, and measure what "Gradient Dynamics of Attention" (arXiv 2512.22473) and
its companions predict: the advantage-based routing law, responsibility-weighted value updates,
two-timescale dynamics and low-dimensional value manifolds.

Sub-packages: ``hooks`` (capture, loading), ``analyses`` (one module per measurement),
``windtunnels`` (tasks with exact posteriors), ``models`` (presets, training, checkpoints),
``experiments`` (the papers' experiments).
"""

from .analyses import AdvantageStats, RoutingLawCheck, one_step_check, verify_routing_law
from .errors import BayesManifoldError
from .hooks import LayerBundle, capture, load_model

__version__ = "0.1.0"

__all__ = [
    "capture",
    "LayerBundle",
    "load_model",
    "verify_routing_law",
    "RoutingLawCheck",
    "AdvantageStats",
    "one_step_check",
    "BayesManifoldError",
]
