"""Importing changes nothing: no output, no global seeding, no torch; an explicit __all__ of every
measurement a user calls; --help lists commands."""

import subprocess
import sys

from bayesmanifold.cli import COMMAND_MODULES, main


def test_import_is_silent_and_does_not_seed():
    code = (
        "import torch, numpy, random;"
        "s = torch.random.get_rng_state().clone(); n = numpy.random.get_state()[1].copy(); r = random.getstate();"
        "import bayesmanifold, bayesmanifold.analyses.routing_law, bayesmanifold.hooks;"
        "assert torch.equal(s, torch.random.get_rng_state()); assert (n == numpy.random.get_state()[1]).all();"
        "assert r == random.getstate()"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout == ""


def test_import_is_cheap():
    code = "import sys, bayesmanifold; print('torch' in sys.modules, len(bayesmanifold.__all__))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["False", str(len(__import__("bayesmanifold").__all__))]
    assert out.stderr == ""


def test_all_is_short_and_importable():
    import bayesmanifold

    # the engine, the error family, and every measurement (accumulator or one-call form)
    assert 0 < len(bayesmanifold.__all__) <= 32  # short: the engine, errors and one entry per measurement
    assert len(set(bayesmanifold.__all__)) == len(bayesmanifold.__all__)
    for name in bayesmanifold.__all__:
        assert hasattr(bayesmanifold, name)
    for name in ("capture", "Batch", "load_model", "BayesManifoldError", "verify_routing_law", "key_orthogonality",
                 "value_manifold", "attention_entropy", "specialization", "DynamicsMonitor", "paper3_protocol"):
        assert name in bayesmanifold.__all__
    from bayesmanifold import analyses

    # every measurement of analyses: its accumulators/monitors and its one-call functions (not the
    # result types, the shared statistics or the base class HeadStats)
    stats = {"pearson", "spearman", "entropy", "js_divergence", "stabilization_step", "settling_step", "collect_features"}
    measurements = {n for n in analyses.__all__ if (n[0].islower() and n not in stats)
                    or (n.endswith(("Accumulator", "Check", "Stats", "Monitor")) and n != "HeadStats")}
    assert measurements <= set(bayesmanifold.__all__), sorted(measurements - set(bayesmanifold.__all__))


def test_help_lists_every_command(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for name in COMMAND_MODULES:
        assert name in out


def test_allocator_tuning_is_cli_only():
    """keep_freed_memory works on Linux/glibc and only processes of our own call it."""
    import pathlib
    import sys

    from bayesmanifold.allocator import keep_freed_memory

    assert keep_freed_memory() is sys.platform.startswith("linux")
    root = pathlib.Path(__file__).resolve().parents[1] / "bayesmanifold"
    callers = sorted(p.relative_to(root).as_posix() for p in root.rglob("*.py") if "keep_freed_memory()" in p.read_text())
    # the CLI commands, and the EM-vs-SGD worker process (started by the library, its own process; its
    # entry point, worker_main, lives in the trainer)
    assert callers == ["commands/demo.py", "commands/reproduce.py", "commands/train.py", "experiments/em_vs_sgd/trainer.py"]


def test_one_registry_of_measurements_feeds_every_consumer():
    """analyses' exports, the scan's --measures and the suite's figures all come from the registry."""
    import bayesmanifold.analyses as analyses
    from bayesmanifold.analyses.registry import MEASUREMENTS, exports, figures, scan_names
    from bayesmanifold.corpus.measures import _ADAPTERS, MEASURES
    from bayesmanifold.suite import FIGURES, SuiteResult

    assert sorted(analyses.__all__) == sorted(exports())
    import importlib
    import types

    for name, module in exports().items():  # every name resolves to what its module exports, never to a module
        value = getattr(analyses, name)
        assert not isinstance(value, types.ModuleType), name
        assert value is getattr(importlib.import_module(f"bayesmanifold.analyses.{module}"), name), name
    assert tuple(MEASURES) == scan_names() and set(_ADAPTERS) == set(scan_names())  # no scan adapter unregistered
    assert FIGURES == figures() and all(hasattr(SuiteResult, f) or f in SuiteResult.__dataclass_fields__
                                        for f in FIGURES.values())
    assert len({m.name for m in MEASUREMENTS}) == len(MEASUREMENTS)
