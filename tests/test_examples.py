"""Every example script runs end to end in its quick mode."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import HAS_HOOKED, TL_VERSION

EXAMPLES = sorted((Path(__file__).parents[1] / "examples").glob("*.py"))


@pytest.mark.parametrize("script", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_example_runs_quick(script, tmp_path):
    if not HAS_HOOKED and "HookedTransformer" in script.read_text(encoding="utf-8").split('"""', 2)[-1]:
        pytest.skip(f"the example builds a HookedTransformer, which TransformerLens {TL_VERSION} does not have")
    env = {**os.environ, "MPLBACKEND": "Agg", "HF_HUB_OFFLINE": "1"}
    out = subprocess.run(
        [sys.executable, str(script), "--quick"], capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip(), "an example should print what it shows"
