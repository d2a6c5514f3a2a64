"""Corpus-scale scans: every per-head measurement streamed over a corpus, resumable, multi-process.

- :mod:`.data`: reading text files, directories, JSON Lines and ``.npy`` token arrays into one
  token stream, packed into ``seq_len`` windows in a fixed, documented order.
- :mod:`.measures`: which accumulators a scan runs (the analyses' own, plus value-update norms
  and per-head value PCAs written here).
- :mod:`.state`: accumulator states as plain tensors and numbers; atomic checkpoints.
- :mod:`.distributed`: torch.distributed (torchrun) processes, each a disjoint shard; states
  gathered and merged at the end.
- :mod:`.scan`: the driver, :func:`scan`; :mod:`.merge`: :func:`merge_runs` for parts run apart.
- :mod:`.output`: CSV/Parquet table, summary.json, heatmaps and an HTML page, written atomically.

Example:
    >>> from bayesmanifold.corpus import ScanConfig, scan
    >>> res = scan(model, ScanConfig(data="corpus.txt", seq_len=64, out="scan/"))  # doctest: +SKIP
"""

from .config import ScanConfig
from .data import TokenStream, read_corpus
from .measures import DEFAULT_MEASURES, MEASURES, ValueManifoldHeads, ValueUpdateNorms
from .merge import merge_runs
from .result import ScanResult, scan_differences
from .scan import scan
from .state import decode_state, encode_state, restore_state

__all__ = [
    "DEFAULT_MEASURES",
    "MEASURES",
    "ScanConfig",
    "ScanResult",
    "TokenStream",
    "ValueManifoldHeads",
    "ValueUpdateNorms",
    "decode_state",
    "encode_state",
    "merge_runs",
    "read_corpus",
    "restore_state",
    "scan",
    "scan_differences",
]
