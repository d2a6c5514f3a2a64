"""The report: the papers' claims tested on a model, as one self-contained HTML page.

- the geometry and dynamics suite it reads is :mod:`bayesmanifold.suite` (what ``analyze`` runs);
- :mod:`.claims`: the papers' claims as one table of named, cited thresholds with pure judges;
- :mod:`.texts`: the sections' titles and how to read them;
- :mod:`.document`: the HTML document, written atomically;
- :mod:`.build`: :func:`build_report`, the stages that measure and the summary.

Example:
    >>> from bayesmanifold.report import ReportConfig, build_report
    >>> path, summary = build_report(ReportConfig(target="toy", out="report", quick=True))  # doctest: +SKIP
"""

from ..suite import SuiteConfig, SuiteResult, Target, load_target, run_suite
from .build import ReportConfig, build_report, summary_lines
from .claims import CLAIMS, Claim, Verdict, judge_claims
from .document import Finding, Report, Section

__all__ = [
    "CLAIMS",
    "Claim",
    "Finding",
    "Report",
    "ReportConfig",
    "Section",
    "SuiteConfig",
    "SuiteResult",
    "Target",
    "Verdict",
    "build_report",
    "judge_claims",
    "load_target",
    "run_suite",
    "summary_lines",
]
