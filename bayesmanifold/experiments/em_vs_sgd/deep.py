"""The deep variant of Paper II's sticky-chain experiment, as a TransformerLens model.

The authors' released script (PAPERS.md section 3, [code]) also trains a deeper model on the
sticky chain: an input projection 20→64, 4 pre-LN blocks × 4 heads, GELU MLP ×4, dropout 0.1,
AdamW 3e-4 with weight decay 0.01, cosine schedule over 2000 steps, gradient clipping at 1.0,
trained on one sequence and tested on a fresh one (seed + 10000); it reports the test predictive
entropy minus ``H_min``. No numbers are published.

Here the blocks are a ``HookedTransformer`` (so every analysis of the library attaches to it;
the model is :class:`bayesmanifold.experiments.em_vs_sgd.sticky_models.DeepStickyModel`) fed
through ``model(h, start_at_layer=0)`` with ``h`` the projected 20-d inputs: the token and
positional embeddings are skipped, as in the released model, which has no positional encoding.
Differences, stated: TransformerLens has no dropout (the released model used 0.1 on attention
weights and the MLP), and its weights start from TransformerLens's initialisation rather than
PyTorch's ``nn.Linear`` default.

Two schedules (the paper has only the first):

* ``adamw``: AdamW 3e-4 on every parameter ("SGD-like": one learning rate);
* ``em_like``: the same, with ``value_lr_mult`` (10) × the learning rate on every value matrix and
  bias (``blocks.*.attn.W_V``, ``b_V``): the deep analogue of the EM-like "M-step" schedule.
"""

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ...errors import ConfigError
from ...windtunnels.sticky_chain import StickyChainConfig, sample_sticky_chain
from .config import TEST_OFFSET

__all__ = ["DeepConfig", "DeepResult", "run_deep_variant"]


@dataclass(frozen=True, kw_only=True)
class DeepConfig:
    """Settings of the deep variant (defaults: the released script's)."""

    seeds: tuple[int, ...] = (42,)
    steps: int = 2000
    lr: float = 3e-4
    weight_decay: float = 0.01
    clip: float = 1.0
    value_lr_mult: float = 10.0
    n_layers: int = 4
    n_heads: int = 4
    d_model: int = 64
    stickiness: float = 0.3
    device: str = "cpu"
    methods: tuple[str, ...] = ("adamw", "em_like")

    def __post_init__(self) -> None:
        if isinstance(self.seeds, int) or len(self.seeds) == 0:
            raise ConfigError(f"seeds must be a non-empty sequence of ints; got {self.seeds!r}")
        object.__setattr__(self, "seeds", tuple(int(s) for s in self.seeds))
        for name in ("steps", "n_layers", "n_heads", "d_model"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ConfigError(f"{name} must be an int > 0; got {v!r}")
        if self.d_model % self.n_heads:
            raise ConfigError(f"d_model ({self.d_model}) must be a multiple of n_heads ({self.n_heads})")
        for name in ("lr", "clip", "value_lr_mult"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
                raise ConfigError(f"{name} must be a finite number > 0; got {v!r}")
        if not (isinstance(self.weight_decay, (int, float)) and self.weight_decay >= 0):
            raise ConfigError(f"weight_decay must be >= 0; got {self.weight_decay!r}")
        bad = set(self.methods) - {"adamw", "em_like"}
        if bad or not self.methods:
            raise ConfigError(f"methods must be among ('adamw', 'em_like'); got {self.methods!r}")
        object.__setattr__(self, "methods", tuple(self.methods))
        StickyChainConfig(stickiness=self.stickiness)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["seeds"], d["methods"] = list(self.seeds), list(self.methods)
        return d


def _model(cfg: DeepConfig, seed: int) -> Any:
    from .sticky_models import DeepStickyModel  # imports TransformerLens: only when used

    return DeepStickyModel(n_layers=cfg.n_layers, n_heads=cfg.n_heads, d_model=cfg.d_model, seed=seed, device=cfg.device)


@dataclass(frozen=True, eq=False)
class DeepResult:
    """Per method and seed: train loss curve, test loss, test entropy and its gap to H_min."""

    config: DeepConfig
    h_min_nats: float
    rows: list[dict[str, Any]]
    curves: dict[str, np.ndarray] = field(repr=False)
    wall_s: float = 0.0

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {"h_min_nats": self.h_min_nats, "config": self.config.to_dict(), "wall_s": self.wall_s}
        for m in self.config.methods:
            rs = [r for r in self.rows if r["method"] == m]
            out[m] = {
                k: float(np.mean([r[k] for r in rs]))
                for k in ("train_loss", "test_loss", "test_entropy", "test_entropy_minus_h_min", "test_accuracy")
            }
        return out

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe: the :meth:`summary` and one row per method and seed."""
        return {**self.summary(), "rows": self.rows}

    def to_dataframe(self):
        """Tidy table: one row per method and seed."""
        import pandas as pd

        return pd.DataFrame(self.rows)

    def plot(self, ax=None):
        import matplotlib.pyplot as plt

        if ax is None:
            _, ax = plt.subplots(figsize=(7, 4))
        for m, c in self.curves.items():
            ax.plot(c.mean(0), label=m)
        ax.axhline(self.h_min_nats, color="k", ls="--", lw=1, label="H_min")
        ax.set_xlabel("step")
        ax.set_ylabel("train loss (nats)")
        ax.set_title("Deep variant (4×4, d 64): training loss")
        ax.legend()
        return ax


def _metrics(logits: Tensor, y: Tensor) -> tuple[float, float, float]:
    logp = torch.log_softmax(logits.double(), -1)
    loss = float(F.nll_loss(logp, y))
    ent = float(-(logp.exp() * logp).sum(-1).mean())
    acc = float((logp.argmax(-1) == y).double().mean())
    return loss, ent, acc


def run_deep_variant(config: DeepConfig | None = None, *, progress: Any = None) -> DeepResult:
    """Train the deep variant with each schedule and evaluate on a fresh sequence."""
    config = DeepConfig() if config is None else config
    say = progress or (lambda msg: None)
    t0 = time.perf_counter()
    chain = StickyChainConfig(stickiness=config.stickiness)
    dev = torch.device(config.device)
    rows, curves = [], {m: [] for m in config.methods}
    for seed in config.seeds:
        train = sample_sticky_chain(chain, seed=seed)
        test = sample_sticky_chain(chain, seed=seed + TEST_OFFSET)
        xtr, ytr = train.inputs[None].to(dev), train.targets.to(dev)
        xte, yte = test.inputs[None].to(dev), test.targets.to(dev)
        for method in config.methods:
            model = _model(config, seed)
            value = [p for n, p in model.named_parameters() if n.endswith(("attn.W_V", "attn.b_V"))]
            vid = {id(p) for p in value}
            rest = [p for p in model.parameters() if id(p) not in vid]
            mult = config.value_lr_mult if method == "em_like" else 1.0
            opt = torch.optim.AdamW(
                [{"params": rest, "lr": config.lr}, {"params": value, "lr": config.lr * mult}],
                weight_decay=config.weight_decay,
            )
            sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, config.steps)
            curve = np.zeros(config.steps)
            model.train()
            for step in range(config.steps):
                opt.zero_grad(set_to_none=True)
                loss = F.cross_entropy(model(xtr)[0], ytr)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), config.clip)
                opt.step()
                sched.step()
                curve[step] = float(loss.detach())
                if (step + 1) % max(config.steps // 4, 1) == 0:
                    say(f"deep {method} seed {seed}: step {step + 1}/{config.steps} loss {curve[step]:.4f}")
            model.eval()
            with torch.no_grad():
                tr = _metrics(model(xtr)[0], ytr)
                te = _metrics(model(xte)[0], yte)
            curves[method].append(curve)
            rows.append({
                "method": method,
                "seed": seed,
                "train_loss": tr[0],
                "test_loss": te[0],
                "test_entropy": te[1],
                "test_entropy_minus_h_min": te[1] - chain.h_min_nats,
                "test_accuracy": te[2],
                "test_loss_minus_h_min": te[0] - chain.h_min_nats,
            })
    return DeepResult(
        config=config,
        h_min_nats=chain.h_min_nats,
        rows=rows,
        curves={m: np.array(c) for m, c in curves.items()},
        wall_s=time.perf_counter() - t0,
    )
