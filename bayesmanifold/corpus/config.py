"""The configuration of a corpus scan: one frozen value, validated when it is made."""

from dataclasses import asdict, dataclass, fields
from typing import Any

from ..errors import ConfigError
from .data import FORMATS
from .measures import DEFAULT_MEASURES, check_measures

__all__ = ["ScanConfig"]

# Fields that change what a scan measures: a resumed run or a merged part must agree on them.
IDENTITY_FIELDS = ("format", "seq_len", "batch_size", "max_tokens", "layers", "measures", "seed")


@dataclass(frozen=True, kw_only=True)
class ScanConfig:
    """What :func:`~bayesmanifold.corpus.scan` reads, measures and writes.

    Attributes:
        data: a text file, a directory of text files, a JSON Lines file or a ``.npy`` token array.
        format: ``"auto"``, ``"text"``, ``"jsonl"`` or ``"tokens"`` (see :mod:`.data`).
        seq_len: tokens per window (2 ≤ seq_len ≤ the model's n_ctx).
        batch_size: windows per pass.
        max_tokens: use at most this many tokens (whole windows); None: the whole corpus.
        layers: the layers to measure (None: all).
        measures: names from :data:`~bayesmanifold.corpus.measures.MEASURES` (default: routing,
            advantage, entropy, value_norms).
        out: directory for checkpoints and outputs (CSV, Parquet, summary.json, figures, HTML);
            None writes nothing.
        checkpoint_every: write a resumable checkpoint every this many batches (0: none; the
            final state is still written to ``out``).
        resume: continue the run whose checkpoints are in ``out``.
        overwrite: replace what ``out`` holds of an earlier run (a finished scan, or an interrupted
            one's checkpoints); without it such a directory is refused before any work.
        seed: recorded with the run (the scan itself draws no random numbers; commands pass it
            to the model loader).
        shard: ``(index, count)``: measure only block ``index`` of ``count`` contiguous blocks of
            batches, for runs on separate machines combined later by :func:`merge_runs`.
        progress: show a progress bar (None: only when stderr is a terminal).
        figures: draw the heatmaps (PNG, and in the HTML page) when writing to ``out``.
    """

    data: str
    format: str = "auto"
    seq_len: int = 128
    batch_size: int = 8
    max_tokens: int | None = None
    layers: tuple[int, ...] | None = None
    measures: tuple[str, ...] = DEFAULT_MEASURES
    out: str | None = None
    checkpoint_every: int = 0
    resume: bool = False
    seed: int = 0
    shard: tuple[int, int] = (0, 1)
    progress: bool | None = None
    figures: bool = True
    overwrite: bool = False

    def __post_init__(self) -> None:
        def positive_int(name: str, v: Any, low: int) -> None:
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                raise ConfigError(f"{name} must be an integer ≥ {low}, got {v!r}")

        if not isinstance(self.data, str) or not self.data:
            raise ConfigError(f"data must be a path, got {self.data!r}")
        if self.format not in FORMATS:
            raise ConfigError(f"format must be one of {', '.join(FORMATS)}, got {self.format!r}")
        positive_int("seq_len", self.seq_len, 2)
        positive_int("batch_size", self.batch_size, 1)
        positive_int("checkpoint_every", self.checkpoint_every, 0)
        positive_int("seed", self.seed, 0)
        if self.max_tokens is not None:
            positive_int("max_tokens", self.max_tokens, 1)
            if self.max_tokens < self.seq_len:
                raise ConfigError(f"max_tokens {self.max_tokens} is less than one window of seq_len {self.seq_len}")
        if self.layers is not None:
            layers = tuple(self.layers)
            if not layers or any(isinstance(x, bool) or not isinstance(x, int) for x in layers):
                raise ConfigError(f"layers must be a non-empty tuple of layer indices or None, got {self.layers!r}")
            object.__setattr__(self, "layers", layers)
        object.__setattr__(self, "measures", check_measures(self.measures))
        shard = tuple(self.shard)
        if len(shard) != 2 or any(isinstance(x, bool) or not isinstance(x, int) for x in shard) or not 0 <= shard[0] < shard[1]:
            raise ConfigError(f"shard must be (index, count) with 0 ≤ index < count, got {self.shard!r}")
        object.__setattr__(self, "shard", shard)
        if self.resume and self.overwrite:
            raise ConfigError("resume continues the run in out and overwrite discards it: give one of them")
        if self.resume and not self.out:
            raise ConfigError("resume needs the output directory (out) that holds the run's checkpoints")
        if self.checkpoint_every and not self.out:
            raise ConfigError("checkpoint_every needs an output directory (out) to write checkpoints to")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["layers"] = None if self.layers is None else list(self.layers)
        d["measures"] = list(self.measures)
        d["shard"] = list(self.shard)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ScanConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ConfigError(f"unknown scan configuration fields {sorted(unknown)}; accepted: {sorted(known)}")
        d = dict(d)
        for k in ("layers", "measures", "shard"):
            if d.get(k) is not None:
                d[k] = tuple(d[k])
        return cls(**d)
