"""Paper-size wind-tunnel runs for an accelerator, and the size trend of the geometry on CPU-sized models.

- :func:`run_paper_size` trains the authors' bijection (or HMM) model within a time budget and
  measures every claim with both protocols (:mod:`.run`, settings in :mod:`.config`);
- :func:`size_trend` measures the authors' value-manifold and focusing protocols on checkpoints
  (or snapshots) of increasing size (:mod:`.trend`).
"""

from .config import PAPER_SCHEDULES, PaperRunConfig, snapshot_schedule
from .run import PaperRunResult, measure_step_time, run_paper_size
from .trend import TrendResult, size_trend

__all__ = ["PAPER_SCHEDULES", "PaperRunConfig", "PaperRunResult", "TrendResult", "measure_step_time",
           "run_paper_size", "size_trend", "snapshot_schedule"]
