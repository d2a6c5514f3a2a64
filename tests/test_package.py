"""Importing changes nothing: no output, no global seeding; a short explicit __all__; --help lists commands."""

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


def test_all_is_short_and_importable():
    import bayesmanifold

    assert 0 < len(bayesmanifold.__all__) <= 15
    for name in bayesmanifold.__all__:
        assert hasattr(bayesmanifold, name)


def test_help_lists_every_command(capsys):
    try:
        main(["--help"])
    except SystemExit as e:
        assert e.code == 0
    out = capsys.readouterr().out
    for name in COMMAND_MODULES:
        assert name in out
