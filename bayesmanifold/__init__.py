"""bayesmanifold: measure the gradient dynamics of attention on TransformerLens models.

Capture, per head, the attention pattern, the values and the upstream gradient in one
forward+backward pass, and measure what "Gradient Dynamics of Attention" (arXiv 2512.22473) and
its companions predict: the advantage-based routing law, responsibility-weighted value updates,
two-timescale dynamics and low-dimensional value manifolds.

Sub-packages: ``hooks`` (capture, the batch value, loading, model access), ``analyses`` (one
module per measurement), ``windtunnels`` (tasks with exact posteriors and calibration against
them), ``models`` (presets, training, checkpoints), ``experiments`` (the papers' experiments),
``report`` (the claims table and the HTML report).

Every name below is imported when first used, so ``import bayesmanifold`` stays cheap (no torch).
"""

import importlib
from typing import Any

__version__ = "0.1.0"

# name -> module that defines it (relative to this package)
_WHERE = {
    # the engine
    "capture": ".hooks",
    "Batch": ".hooks",
    "LayerBundle": ".hooks",
    "load_model": ".models.target",  # open_model under its familiar name
    "logit_lens_kl": ".analyses",
    "BayesManifoldError": ".errors",
    # the measurements: accumulators for capture, and their one-call forms
    "RoutingLawCheck": ".analyses",
    "verify_routing_law": ".analyses",
    "AdvantageStats": ".analyses",
    "one_step_check": ".analyses",
    "AttentionEntropyAccumulator": ".analyses",
    "attention_entropy": ".analyses",
    "QKAlignmentAccumulator": ".analyses",
    "query_key_alignment": ".analyses",
    "key_orthogonality": ".analyses",
    "FeatureAccumulator": ".analyses",
    "ManifoldAccumulator": ".analyses",
    "value_manifold": ".analyses",
    "SpecializationAccumulator": ".analyses",
    "specialization": ".analyses",
    "value_update_alignment": ".analyses",
    "positive_feedback_probe": ".analyses",
    "head_ablation": ".analyses",
    "DynamicsMonitor": ".analyses",
    "replay": ".analyses",
    "paper3_protocol": ".analyses",
    "sula_test": ".analyses",
    "RoutingMapAccumulator": ".analyses",
    "routing_map": ".analyses",
    "induction_scores": ".analyses",
    "measure_protocols": ".analyses",
    "measure_calibration": ".windtunnels.calibration",
}

# public name -> the name in its module, where they differ
_RENAMED = {"load_model": "open_model"}

__all__ = list(_WHERE)


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'bayesmanifold' has no attribute {name!r}")
    value = getattr(importlib.import_module(_WHERE[name], __name__), _RENAMED.get(name, name))
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
