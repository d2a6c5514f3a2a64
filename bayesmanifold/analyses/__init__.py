"""Analyses: one module per measurement, each an accumulator fed by capture and a result value.

Every name below is importable from ``bayesmanifold.analyses``; a module is imported when one of
its names is first used, so importing the package stays cheap.
"""

import importlib
from typing import Any

# name -> module (relative to this package) that defines it
_WHERE = {
    "RoutingLawCheck": "routing_law",
    "RoutingLawResult": "routing_law",
    "verify_routing_law": "routing_law",
    "AdvantageStats": "advantage",
    "AdvantageResult": "advantage",
    "OneStepResult": "one_step",
    "one_step_check": "one_step",
    "HeadStats": "headstats",
    "ManifoldAccumulator": "manifold",
    "ManifoldResult": "manifold",
    "FeatureAccumulator": "features",
    "collect_features": "features",
    "value_manifold": "features",
    "KeyOrthogonalityResult": "keys",
    "key_orthogonality": "keys",
    "AttentionEntropyAccumulator": "attention",
    "AttentionEntropyResult": "attention",
    "attention_entropy": "attention",
    "QKAlignmentAccumulator": "attention",
    "QKAlignmentResult": "attention",
    "query_key_alignment": "attention",
    "HeadAblationResult": "ablation",
    "head_ablation": "ablation",
    "SpecializationAccumulator": "specialization",
    "SpecializationResult": "specialization",
    "specialization": "specialization",
    "ValueUpdateAlignmentResult": "value_updates",
    "value_update_alignment": "value_updates",
    "PositiveFeedbackResult": "feedback",
    "positive_feedback_probe": "feedback",
    "DynamicsMonitor": "monitor",
    "DynamicsResult": "dynamics",
    "replay": "monitor",
    "Paper3Result": "paper3",
    "paper3_protocol": "paper3",
    "RoutingMap": "routing_maps",
    "RoutingMapAccumulator": "routing_maps",
    "routing_map": "routing_maps",  # module name differs: a submodule attribute would shadow the function
    "induction_scores": "induction",
    "LogitLensResult": "logit_lens",
    "logit_lens_kl": "logit_lens",
    "InductionResult": "induction",
    "measure_protocols": "protocols",
    "ProtocolConfig": "protocols",
    "ProtocolResult": "protocols",
    "PROTOCOLS": "protocols",
    "FinalManifoldResult": "final_manifold",
    "pearson": "stats",
    "spearman": "stats",
    "entropy": "stats",
    "js_divergence": "stats",
    "stabilization_step": "stats",
    "settling_step": "stats",
}

__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'bayesmanifold.analyses' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
