"""``bayesmanifold scan`` and ``merge`` on the command line, and the same scan under torchrun."""

import json
import math
import multiprocessing as mp
import os
import random
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from bayesmanifold.cli import main
from bayesmanifold.errors import InputError

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


def _cli_rank(rank, port, argv, q):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    q.put((rank, main(argv)))


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_scan_one_process_equals_two_and_merged_shards(corpus, tmp_path, keep_rng, capfd):
    # two processes as torchrun starts them (its environment variables, gloo), forked from this one
    ctx, port = mp.get_context("fork"), _free_port()
    q = ctx.Queue()
    argv = ["scan", "toy", "--data", str(corpus), *ARGS, "--out", str(tmp_path / "two"), "--json", str(tmp_path / "two.json")]
    procs = [ctx.Process(target=_cli_rank, args=(r, port, argv, q)) for r in range(2)]
    for p in procs:
        p.start()
    codes = dict(q.get(timeout=300) for _ in procs)
    for p in procs:
        p.join(timeout=60)
    assert codes == {0: 0, 1: 0}
    assert capfd.readouterr().out.count("read as text") == 1  # rank 0 alone reports
    # one process, and two shards run apart then merged
    assert main(["scan", "toy", "--data", str(corpus), *ARGS, "--json", str(tmp_path / "one.json")]) == 0
    for k in range(2):
        assert main(["scan", "toy", "--data", str(corpus), *ARGS, "--shard", f"{k}/2", "--out", str(tmp_path / f"s{k}")]) == 0
    assert main(["merge", str(tmp_path / "s0"), str(tmp_path / "s1"), "--no-figures", "--json", str(tmp_path / "m.json")]) == 0
    assert "UTF-8 bytes (the model has no tokenizer)" in capfd.readouterr().out
    one = json.loads((tmp_path / "one.json").read_text())
    assert {"n_tokens", "n_sequences", "world_size", "max_rel_residual_dscores", "heads"} <= set(one)
    assert one["n_tokens"] == 320 and one["n_sequences"] == 10 and one["world_size"] == 1
    assert len(one["heads"]) == 2 * 4 and one["max_rel_residual_dscores"] < 1e-12
    assert one["data"]["tokenization"] == "utf8-bytes" and one["heads"][0]["layer"] == 0
    two = json.loads((tmp_path / "two.json").read_text())
    assert two["world_size"] == 2
    for other, rtol in ((two, 1e-9), (json.loads((tmp_path / "m.json").read_text()), 1e-12)):
        assert other["n_tokens"] == one["n_tokens"] and other["n_sequences"] == one["n_sequences"]
        assert close(other["heads"], one["heads"], rtol)


@pytest.mark.skipif(not os.environ.get("BAYESMANIFOLD_TEST_TORCHRUN"),
                    reason="starts torchrun and two interpreters (~30 s of CPU); set BAYESMANIFOLD_TEST_TORCHRUN=1")
def test_torchrun_two_processes_equal_one(corpus, tmp_path, keep_rng):
    """The real launcher: ``torchrun --standalone --nproc-per-node 2 -m bayesmanifold scan``."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    two = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "bayesmanifold",
         "scan", "toy", "--data", str(corpus), *ARGS, "--json", str(tmp_path / "two.json")],
        capture_output=True, text=True, env=env, timeout=600,
    )
    assert two.returncode == 0, two.stderr[-3000:]
    assert two.stdout.count("read as text") == 1
    assert main(["scan", "toy", "--data", str(corpus), *ARGS, "--json", str(tmp_path / "one.json")]) == 0
    one, dist2 = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("one", "two"))
    assert dist2["world_size"] == 2 and dist2["n_tokens"] == one["n_tokens"]
    assert close(dist2["heads"], one["heads"], 1e-9)


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


def test_scan_differences_reads_results_dicts_and_files(tmp_path):
    from bayesmanifold.corpus import scan_differences

    a = {"heads": [{"layer": 0, "head": 0, "x": 1.0, "ok": True, "n": float("nan")},
                   {"layer": 0, "head": 1, "x": 0.0, "ok": True, "n": float("nan")}]}
    b = {"heads": [{"layer": 0, "head": 1, "x": 0.0, "ok": True, "n": float("nan")},
                   {"layer": 0, "head": 0, "x": 1.0 + 1e-6, "ok": True, "n": float("nan")}]}
    d = scan_differences(a, b)
    assert d["x"] == pytest.approx(1e-6 / (1 + 1e-6)) and d["ok"] == 0.0 and d["n"] == 0.0
    b["heads"][0]["ok"] = False
    (tmp_path / "summary.json").write_text(json.dumps(b))
    assert scan_differences(a, tmp_path)["ok"] == 1.0  # a scan directory holding summary.json
    with pytest.raises(InputError, match="different heads"):
        scan_differences(a, {"heads": a["heads"][:1]})
    with pytest.raises(InputError, match="neither a scan directory"):
        scan_differences(a, tmp_path / "nope")
