"""``bayesmanifold prepare``: open a model once, so that later opens are fast.

A ``.gguf`` file (and ``smollm2-135m``, which is one) is dequantized on its first open and cached
as a HuggingFace directory; ``make setup`` runs this once per environment, so the demo and the
tests do not pay the conversion. For any other model it checks that the model opens.
"""

import argparse
import time

from .common import add_model_args

NAME = "prepare"
HELP = "open a model once (a .gguf file or smollm2-135m is converted and cached) and print what it is"
EXAMPLE = "bayesmanifold prepare smollm2-135m"


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_args(p, positional="model")


def run(args: argparse.Namespace) -> int:
    from ..backends import model_access
    from .common import open_model_from

    t0 = time.perf_counter()
    target = open_model_from(args)
    access = model_access(target.model)
    n_params = sum(p.numel() for p in target.model.parameters())
    print(f"{args.model}: {access.n_layers} layers x {access.n_heads} heads ({access.n_kv_heads} key/value heads), "
          f"{n_params / 1e6:.1f}M parameters, {str(target.dtype).removeprefix('torch.')}, "
          f"opened in {time.perf_counter() - t0:.1f} s")
    return 0
