"""The one registry of measurements: what each measures, the module that defines it, the names it
exports, and which consumers take it (the corpus scan's ``--measures``, the suite's figures).

``bayesmanifold.analyses`` exports the names listed here; :mod:`bayesmanifold.corpus.measures`
streams the measurements that have a ``scan`` name (it adds how each becomes per-head rows);
:mod:`bayesmanifold.suite` draws the ones that have a ``figure``. A new measurement is a module
plus one entry here. Importing this module imports no measurement (it holds names only).
"""

from dataclasses import dataclass

__all__ = ["MEASUREMENTS", "Measurement", "SHARED", "exports", "figures", "scan_names"]


@dataclass(frozen=True)
class Measurement:
    """One measurement of the papers.

    Attributes:
        name: its name.
        title: what it measures, in a few words.
        module: the module of ``bayesmanifold.analyses`` that defines it.
        exports: the names ``bayesmanifold.analyses`` exports from that module.
        scan: its name in ``bayesmanifold scan --measures`` (a streaming accumulator), or None.
        figure: the figure the suite and the report draw from it, or None.
        result_field: the :class:`~bayesmanifold.suite.SuiteResult` attribute holding the result
            that draws ``figure``.
    """

    name: str
    title: str
    module: str
    exports: tuple[str, ...]
    scan: str | None = None
    figure: str | None = None
    result_field: str | None = None


MEASUREMENTS: tuple[Measurement, ...] = (
    Measurement("routing_law", "the routing and value laws against autograd", "routing_law",
                ("RoutingLawCheck", "RoutingLawResult", "verify_routing_law"), scan="routing"),
    Measurement("advantage", "the advantage A, attention mass on A > 0, routing concentration", "advantage",
                ("AdvantageStats", "AdvantageResult"), scan="advantage"),
    Measurement("one_step", "one gradient step: does attention move toward A > 0", "one_step",
                ("OneStepResult", "one_step_check")),
    Measurement("key_orthogonality", "orthogonality of the hypothesis-token keys", "keys",
                ("KeyOrthogonalityResult", "key_orthogonality"),
                figure="key_orthogonality", result_field="key_orthogonality"),
    Measurement("value_manifold", "PCA of representations, coloured by the Bayes entropy", "features",
                ("FeatureAccumulator", "collect_features", "value_manifold"),
                figure="value_manifold", result_field="manifold"),
    Measurement("value_manifold_heads", "streaming PCA of value vectors", "manifold",
                ("ManifoldAccumulator", "ManifoldResult"), scan="manifold"),
    Measurement("attention_entropy", "attention entropy per layer and its reduction (focusing)", "attention",
                ("AttentionEntropyAccumulator", "AttentionEntropyResult", "attention_entropy"),
                scan="entropy", figure="attention_entropy", result_field="attention_entropy"),
    Measurement("query_key_alignment", "alignment of queries with their attended keys", "attention",
                ("QKAlignmentAccumulator", "QKAlignmentResult", "query_key_alignment")),
    Measurement("head_ablation", "the loss change when a head is ablated", "ablation",
                ("HeadAblationResult", "head_ablation")),
    # a module named as one of its functions would be replaced by the module once imported: named apart
    Measurement("specialization", "value specialization over groups of queries", "value_specialization",
                ("SpecializationAccumulator", "SpecializationResult", "specialization"),
                scan="specialization", figure="specialization", result_field="specialization"),
    Measurement("value_updates", "responsibility-weighted value updates ‖Σ_i α_ij u_i‖", "value_updates",
                ("ValueUpdateAlignmentResult", "value_update_alignment"), scan="value_norms"),
    Measurement("positive_feedback", "the positive-feedback probe of Paper II", "feedback",
                ("PositiveFeedbackResult", "positive_feedback_probe")),
    Measurement("dynamics", "frame and precision over training (two timescales)", "monitor",
                ("DynamicsMonitor", "replay"), figure="dynamics", result_field="dynamics"),
    Measurement("dynamics_result", "the two timescales' result value", "dynamics", ("DynamicsResult",)),
    Measurement("paper3", "Paper III's geometry at the final token of prompts", "paper3",
                ("Paper3Result", "paper3_protocol"), figure="paper3", result_field="paper3"),
    Measurement("sula", "in-context Bayesian updating on noisy labels (Paper III's SULA)", "sula",
                ("SulaConfig", "SulaResult", "sula_test")),
    Measurement("routing_map", "per head and token: α, A and the routing force", "routing_maps",
                ("RoutingMap", "RoutingMapAccumulator", "routing_map")),
    Measurement("induction", "induction scores per head", "induction", ("InductionResult", "induction_scores")),
    Measurement("logit_lens", "KL of each layer's logit lens to the exact posterior", "logit_lens",
                ("LogitLensResult", "logit_lens_kl")),
    Measurement("protocols", "each geometric claim on the authors' protocol beside ours", "protocols",
                ("measure_protocols", "ProtocolConfig", "ProtocolResult", "PROTOCOLS")),
    Measurement("final_manifold", "the authors' value manifold with a position control", "final_manifold",
                ("FinalManifoldResult",)),
)

#: Names that are not measurements: the shared per-head tables and statistics (module -> names).
SHARED: dict[str, tuple[str, ...]] = {
    "headstats": ("HeadStats",),
    "stats": ("pearson", "spearman", "entropy", "js_divergence", "stabilization_step", "settling_step"),
}


def exports() -> dict[str, str]:
    """Every name ``bayesmanifold.analyses`` exports -> the module that defines it."""
    out = {n: m.module for m in MEASUREMENTS for n in m.exports}
    out.update({n: module for module, names in SHARED.items() for n in names})
    return out


def scan_names() -> tuple[str, ...]:
    """The measurements a corpus scan can stream, by their ``--measures`` names, in registry order."""
    return tuple(m.scan for m in MEASUREMENTS if m.scan)


def figures() -> dict[str, str]:
    """Figure name -> the SuiteResult attribute whose result draws it, in report order (the registry's)."""
    return {m.figure: m.result_field for m in MEASUREMENTS if m.figure}
