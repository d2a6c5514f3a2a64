"""``bayesmanifold scan`` and ``merge`` on the command line, and the same scan under torchrun."""

import json
import math
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from bayesmanifold.cli import main

ARGS = ["--dtype", "float64", "--seq-len", "32", "--batch-size", "2", "--max-tokens", "320", "--no-figures"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    f = tmp_path_factory.mktemp("cli") / "corpus.txt"
    f.write_text("".join(p.read_text() for p in sorted(Path(json.__file__).parent.glob("*.py"))[:2]))
    return f


@pytest.fixture
def keep_rng():
    """The toy model is built with TransformerLens's seed (it reseeds the global generators):
    put them back as they were."""
    states = torch.random.get_rng_state(), np.random.get_state(), random.getstate()
    yield
    torch.random.set_rng_state(states[0])
    np.random.set_state(states[1])
    random.setstate(states[2])


def close(a, b, rtol):
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(close(a[k], b[k], rtol) for k in a if k not in ("elapsed_s", "tokens_per_s"))
    if isinstance(a, list):
        return len(a) == len(b) and all(close(x, y, rtol) for x, y in zip(a, b))
    if isinstance(a, float) and isinstance(b, float):
        return (math.isnan(a) and math.isnan(b)) or abs(a - b) <= rtol * max(abs(a), abs(b))
    return a == b


def test_scan_one_process_equals_torchrun_two_and_merge(corpus, tmp_path, keep_rng, capsys):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    two = subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "bayesmanifold",
         "scan", "toy", "--data", str(corpus), *ARGS, "--out", str(tmp_path / "two"), "--json", str(tmp_path / "two.json")],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )
    try:
        # meanwhile, in this process: one process, and two shards merged
        assert main(["scan", "toy", "--data", str(corpus), *ARGS, "--json", str(tmp_path / "one.json")]) == 0
        for k in range(2):
            assert main(["scan", "toy", "--data", str(corpus), *ARGS, "--shard", f"{k}/2", "--out", str(tmp_path / f"s{k}")]) == 0
        assert main(["merge", str(tmp_path / "s0"), str(tmp_path / "s1"), "--no-figures", "--json", str(tmp_path / "m.json")]) == 0
        printed = capsys.readouterr().out
        stdout, stderr = two.communicate(timeout=600)
    finally:
        two.kill()
    assert two.returncode == 0, stderr[-3000:]
    assert "UTF-8 bytes (the model has no tokenizer)" in printed
    one = json.loads((tmp_path / "one.json").read_text())
    assert {"n_tokens", "n_sequences", "world_size", "max_rel_residual_dscores", "heads"} <= set(one)
    assert one["n_tokens"] == 320 and one["n_sequences"] == 10 and one["world_size"] == 1
    assert len(one["heads"]) == 2 * 4 and one["max_rel_residual_dscores"] < 1e-12
    assert one["data"]["tokenization"] == "utf8-bytes" and one["heads"][0]["layer"] == 0
    dist2 = json.loads((tmp_path / "two.json").read_text())
    assert dist2["world_size"] == 2 and stdout.count("read as text") == 1  # rank 0 alone reports
    for other, rtol in ((dist2, 1e-9), (json.loads((tmp_path / "m.json").read_text()), 1e-12)):
        assert other["n_tokens"] == one["n_tokens"] and other["n_sequences"] == one["n_sequences"]
        assert close(other["heads"], one["heads"], rtol)
    shutil.rmtree(tmp_path / "two")


@pytest.mark.parametrize("extra,needle", [
    (["--data", "{missing}"], "does not exist"),
    (["--data", "{corpus}", "--seq-len", "200"], "exceeds the model's context n_ctx=128"),
    (["--data", "{corpus}", "--measures", "routing,nope"], "unknown measures"),
    (["--data", "{corpus}", "--resume"], "resume needs"),
    (["--data", "{corpus}", "--shard", "3"], "--shard '3' not understood"),
])
def test_bad_input_is_one_line_and_exit_2(corpus, tmp_path, keep_rng, capsys, extra, needle):
    argv = ["scan", "toy"] + [a.format(missing=tmp_path / "nope.txt", corpus=corpus) for a in extra]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("bayesmanifold scan: error:") and needle in err
    assert not list(tmp_path.iterdir())  # nothing half-written
