"""The corpus scan: results, kill-and-resume, merge of shards, 2 processes against 1, bad input."""

import io
import json
import math
import multiprocessing as mp
import os
import shutil
import signal
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from helpers import make_model

from bayesmanifold.corpus import MEASURES, ScanConfig, encode_state, merge_runs, restore_state, scan
from bayesmanifold.corpus.measures import ModelShape
from bayesmanifold.corpus.result import build_result
from bayesmanifold.corpus.state import decode_state, load_checkpoint
from bayesmanifold.errors import CheckpointError, ConfigError, InputError
from bayesmanifold.hooks import Batch, capture

ALL = tuple(MEASURES)
SEQ, BATCH, N_BATCHES = 32, 2, 6
TIMING = ("elapsed_s", "tokens_per_s")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A few of the standard library's json modules, as text files."""
    d = tmp_path_factory.mktemp("corpus")
    for f in sorted(Path(json.__file__).parent.glob("*.py"))[:3]:
        shutil.copy(f, d / f.name)
    return d


@pytest.fixture(scope="module")
def model():
    return make_model(d_vocab=256, n_ctx=64)


def config(corpus, out=None, **kw):
    base = dict(data=str(corpus), seq_len=SEQ, batch_size=BATCH, max_tokens=SEQ * BATCH * N_BATCHES, measures=ALL,
                figures=False)
    return ScanConfig(**{**base, "out": None if out is None else str(out), **kw})


@pytest.fixture(scope="module")
def reference(model, corpus, tmp_path_factory):
    """The uninterrupted one-process scan, written to a directory."""
    out = tmp_path_factory.mktemp("ref")
    return scan(model, config(corpus, out)), out


def same(a: dict, b: dict) -> bool:
    """Exactly equal JSON forms, NaN equal to NaN, timings left out."""
    def clean(x):
        if isinstance(x, dict):
            return {k: clean(v) for k, v in x.items() if k not in TIMING}
        if isinstance(x, list):
            return [clean(v) for v in x]
        return "nan" if isinstance(x, float) and math.isnan(x) else x
    return clean(a) == clean(b)


def assert_close_rows(rows_a, rows_b, rtol=1e-9):
    assert len(rows_a) == len(rows_b)
    for ra, rb in zip(rows_a, rows_b):
        assert ra.keys() == rb.keys()
        for k, x in ra.items():
            y = rb[k]
            if isinstance(x, float) and isinstance(y, float):
                assert (math.isnan(x) and math.isnan(y)) or abs(x - y) <= rtol * max(abs(x), abs(y)), (k, x, y)
            else:
                assert x == y, (k, x, y)  # counts, flags and indices exactly


def test_result_outputs_and_json_fields(reference, model):
    res, out = reference
    n_heads = model.cfg.n_layers * model.cfg.n_heads
    assert res.n_tokens == SEQ * BATCH * N_BATCHES and res.summary["n_sequences"] == BATCH * N_BATCHES
    assert res.summary["world_size"] == 1 and res.summary["data"]["tokenization"] == "utf8-bytes"
    assert res.summary["max_rel_residual_dscores"] < 1e-12 and res.summary["routing_law_holds"]
    df = res.to_dataframe()
    assert len(df) == n_heads and {"mass_positive", "attention_entropy", "value_update_norm_mean",
                                   "spec_specialist_share", "value_pc1_share"} <= set(df.columns)
    # ‖Σ_i α_ij u_i‖ against a direct computation from one capture's kept bundles
    summary = json.loads((out / "summary.json").read_text())
    assert {"n_tokens", "n_sequences", "world_size", "max_rel_residual_dscores", "heads"} <= set(summary)
    assert len(summary["heads"]) == n_heads and {"layer", "head", "mass_positive"} <= set(summary["heads"][0])
    assert (out / "heads.csv").read_text().count("\n") == n_heads + 1
    assert (out / "heads.parquet").is_file() and "<table" in (out / "index.html").read_text()
    assert not list((out / "checkpoints").glob("*.pt"))  # per-rank checkpoints go once the state is final
    assert "WORLD_SIZE" not in os.environ and not dist.is_initialized()


def test_figures_are_heatmaps_embedded_in_the_page(model, corpus, tmp_path):
    scan(model, config(corpus, tmp_path, measures=("entropy",), max_tokens=SEQ * BATCH, figures=True))
    png = (tmp_path / "figures" / "attention_entropy.png").read_bytes()
    assert png.startswith(b"\x89PNG") and [p.name for p in (tmp_path / "figures").iterdir()] == ["attention_entropy.png"]
    assert "data:image/png;base64," in (tmp_path / "index.html").read_text()


@pytest.mark.parametrize("kv", [None, 2])
def test_value_update_norms_match_a_direct_computation(model, corpus, kv):
    from bayesmanifold.backends import model_access
    from bayesmanifold.corpus.data import read_corpus

    if kv is not None:  # grouped-query attention: each query head's own Σ_i α_ij u_i
        model = make_model(d_vocab=256, n_ctx=64, n_key_value_heads=kv)
    stream = read_corpus(corpus, model_access(model), seq_len=SEQ, max_tokens=SEQ * BATCH)
    res = scan(model, config(corpus, measures=("value_norms",), max_tokens=SEQ * BATCH))
    with capture(model, keep=True) as cap:
        cap.run(stream.window(0, BATCH))
        kept = dict(cap.kept)
    for r in res.rows:
        b = kept[r["layer"]]
        h = r["head"]
        direct = torch.einsum("bqk,bqd->bkd", b.pattern[:, h], b.grad_z[:, :, h]).norm(dim=-1)
        assert r["value_update_norm_mean"] == pytest.approx(float(direct.mean()), rel=1e-12)
        assert r["value_update_norm_max"] == pytest.approx(float(direct.max()), rel=1e-12)


def test_restored_state_finalizes_exactly_like_the_original(model, corpus):
    from bayesmanifold.backends import model_access
    from bayesmanifold.corpus.data import read_corpus

    access = model_access(model)
    shape = ModelShape(access.n_layers, access.n_heads, access.n_kv_heads, access.d_head, (0, 1))
    accs = {n: MEASURES[n].make(shape) for n in ALL}
    stream = read_corpus(corpus, access, seq_len=SEQ, max_tokens=SEQ * 4)
    from bayesmanifold.corpus.measures import position_groups

    with capture(model, accumulators=list(accs.values())) as cap:
        for k in range(2):
            cap.run(Batch(tokens=stream.window(2 * k, 2 * k + 2), labels={"group": position_groups(2, SEQ)}))
    buf = io.BytesIO()
    torch.save({n: encode_state(a) for n, a in accs.items()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    restored = {n: restore_state(MEASURES[n].make(shape), saved[n]) for n in ALL}
    assert same(build_result(accs, {}).to_dict(), build_result(restored, {}).to_dict())
    assert decode_state(encode_state(accs["advantage"])["hist"])[0].dtype == torch.float64


def test_state_does_not_grow_with_tokens(model, corpus, tmp_path):
    """What a checkpoint holds (the whole state) has the same size after 1 and after 3 batches."""
    sizes = []
    for n in (1, 3):
        scan(model, config(corpus, tmp_path / str(n), max_tokens=SEQ * BATCH * n))
        state = load_checkpoint(tmp_path / str(n) / "state.pt")["accumulators"]
        sizes.append(sum(t.numel() for t in _tensors(state)))
    assert sizes[0] == sizes[1]


def _tensors(x):
    if isinstance(x, torch.Tensor):
        yield x
    elif isinstance(x, dict):
        for v in x.values():
            yield from _tensors(v)
    elif isinstance(x, list | tuple):
        for v in x:
            yield from _tensors(v)


class Kill(Exception):
    pass


def kill_after(n):
    def on_batch(k):
        if k + 1 == n:
            raise Kill
    return on_batch


def test_kill_and_resume_equals_uninterrupted(model, corpus, reference, tmp_path):
    ref, _ = reference
    out = tmp_path / "run"
    cfg = config(corpus, out, checkpoint_every=2)
    with pytest.raises(Kill):
        scan(model, cfg, on_batch=kill_after(3))  # killed after batch 3; the last checkpoint is at 2
    ck = load_checkpoint(out / "checkpoints" / "rank0-of-1.pt")
    assert ck["next_batch"] == 2 and not ck["complete"] and not (out / "state.pt").exists()
    # a resume directory from another run is refused before any work
    with pytest.raises(CheckpointError, match="seq_len"):
        scan(model, config(corpus, out, checkpoint_every=2, resume=True, seq_len=16))
    with pytest.raises(CheckpointError, match="the model"):
        scan(make_model(d_vocab=256, n_ctx=64, seed=1), config(corpus, out, checkpoint_every=2, resume=True))
    other = tmp_path / "other.txt"
    other.write_text((Path(corpus) / sorted(os.listdir(corpus))[0]).read_text()[::-1])
    with pytest.raises(CheckpointError, match="the data"):
        scan(model, config(other, out, checkpoint_every=2, resume=True))
    with pytest.raises(CheckpointError, match="nothing to resume"):
        scan(model, config(corpus, tmp_path / "empty", resume=True))
    res = scan(model, config(corpus, out, checkpoint_every=2, resume=True))
    assert same(res.to_dict(), ref.to_dict())
    # resuming a finished run measures nothing again and gives the same result
    again = scan(model, config(corpus, out, checkpoint_every=2, resume=True), on_batch=kill_after(1))
    assert same(again.to_dict(), ref.to_dict())


def test_sigint_stops_after_the_batch_with_a_checkpoint(model, corpus, reference, tmp_path):
    ref, _ = reference
    out = tmp_path / "run"

    def interrupt(k):
        if k == 0:
            os.kill(os.getpid(), signal.SIGINT)

    before = signal.getsignal(signal.SIGINT)
    with pytest.raises(KeyboardInterrupt):
        scan(model, config(corpus, out), on_batch=interrupt)
    assert signal.getsignal(signal.SIGINT) is before
    assert load_checkpoint(out / "checkpoints" / "rank0-of-1.pt")["next_batch"] == 2
    assert same(scan(model, config(corpus, out, resume=True)).to_dict(), ref.to_dict())


def test_merge_of_shards_equals_one_pass_and_refuses_bad_parts(model, corpus, reference, tmp_path):
    ref, _ = reference
    parts = []
    for k in range(2):
        parts.append(tmp_path / f"part{k}")
        scan(model, config(corpus, parts[-1], shard=(k, 2)))
    merged = merge_runs(parts[::-1], out=tmp_path / "merged", figures=False)
    assert merged.summary["n_tokens"] == ref.n_tokens and merged.summary["covers_whole_corpus"]
    assert_close_rows(merged.rows, ref.rows, rtol=1e-12)
    assert json.loads((tmp_path / "merged" / "summary.json").read_text())["batches"] == [[0, N_BATCHES]]
    with pytest.raises(InputError, match="overlap"):
        merge_runs([parts[0], parts[0]])
    with pytest.raises(InputError, match="overlap"):
        merge_runs([tmp_path / "merged", parts[1]])
    odd = tmp_path / "odd"
    scan(model, config(corpus, odd, shard=(1, 2), batch_size=3))
    with pytest.raises(CheckpointError, match="batch_size"):
        merge_runs([parts[0], odd])
    with pytest.raises(CheckpointError, match="no finished scan"):
        merge_runs([parts[0], tmp_path / "nothing"])
    with pytest.raises(InputError, match="at least two"):
        merge_runs([parts[0]])


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank, world, port, model, cfg, q):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    try:
        res = scan(model, cfg)
        q.put((rank, "ok", res.to_dict(), dist.is_initialized()))
    except Exception as exc:  # reported to the test
        q.put((rank, type(exc).__name__, str(exc), None))


def _run_processes(model, cfg, world=2):
    ctx = mp.get_context("fork")  # the children share the parent's imports: no interpreter start-up
    q, port = ctx.Queue(), _free_port()
    procs = [ctx.Process(target=_rank_main, args=(r, world, port, model, cfg, q)) for r in range(world)]
    for p in procs:
        p.start()
    out = dict((r, (kind, payload, init)) for r, kind, payload, init in (q.get(timeout=120) for _ in procs))
    for p in procs:
        p.join(timeout=60)
    return out


def test_two_processes_equal_one(model, corpus, reference, tmp_path):
    ref, _ = reference
    out = _run_processes(model, config(corpus, tmp_path / "two"))
    assert [out[r][0] for r in (0, 1)] == ["ok", "ok"], out
    two = out[0][1]
    assert same(two, out[1][1])  # every rank returns the merged result
    assert out[0][2] is False and out[1][2] is False  # the process group the scan made is destroyed
    assert two["world_size"] == 2 and two["n_tokens"] == ref.n_tokens and two["n_sequences"] == BATCH * N_BATCHES
    assert_close_rows(two["heads"], ref.to_dict()["heads"])
    assert json.loads((tmp_path / "two" / "summary.json").read_text())["world_size"] == 2


def test_more_processes_than_sequences_is_refused(model, corpus):
    out = _run_processes(model, config(corpus, max_tokens=SEQ))
    assert {out[r][0] for r in (0, 1)} == {"InputError"}
    assert "2 processes but only 1 sequences" in out[0][1]


def test_bad_configuration_and_context(model, corpus):
    with pytest.raises(InputError, match="exceeds the model's context n_ctx=64"):
        scan(model, config(corpus, seq_len=65, max_tokens=None))
    with pytest.raises(ConfigError, match="resume needs"):
        config(corpus, resume=True)
    with pytest.raises(ConfigError, match="unknown measures"):
        config(corpus, measures=("routing", "nope"))
    with pytest.raises(ConfigError, match="shard"):
        config(corpus, shard=(2, 2))
    with pytest.raises(ConfigError, match="max_tokens"):
        config(corpus, max_tokens=3)
    with pytest.raises(InputError, match="shard 5/6 is empty"):
        scan(model, config(corpus, shard=(5, 6), max_tokens=SEQ * BATCH * 2))
    cfg = config(corpus)
    assert ScanConfig.from_dict(cfg.to_dict()) == cfg


def test_a_model_with_a_tokenizer_reads_text_with_it(hf_gpt2_dir, tmp_path):
    from bayesmanifold.backends import load_hf_directory

    model = load_hf_directory(hf_gpt2_dir, dtype="float64")
    (tmp_path / "doc.jsonl").write_text("\n".join(json.dumps({"text": "the quick brown fox jumps. " * 3}) for _ in range(4)))
    res = scan(model, ScanConfig(data=str(tmp_path / "doc.jsonl"), seq_len=16, batch_size=2, measures=("routing", "entropy")))
    assert res.summary["data"]["tokenization"] == "tokenizer" and res.summary["data"]["n_documents"] == 4
    assert res.n_tokens == 16 * (4 * (1 + 81) // 16)  # BOS + 81 characters per document, whole windows
    assert res.summary["routing_law_holds"]
