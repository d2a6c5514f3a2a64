"""The shipped Paper III prompt set: its shape, its stratification and its provenance."""

import hashlib
import re
import sysconfig
from pathlib import Path

import pytest

from bayesmanifold.analyses.paper3 import read_prompts
from bayesmanifold.data import PROMPT_SETS, prompt_set_path, provenance, read_prompt_records
from bayesmanifold.errors import InputError

FIELDS = {"id", "text", "domain", "source", "byte_start", "byte_end", "sha256", "python_version", "source_license",
          "n_tokens", "entropy_nats", "quintile"}
DOMAINS = {"code", "documentation", "licence", "prose"}
ROOTS = {"stdlib": Path(sysconfig.get_paths()["stdlib"]), "common-licenses": Path("/usr/share/common-licenses")}


@pytest.fixture(scope="module")
def records():
    return read_prompt_records("paper3-smollm2")


def test_the_set_is_stratified_as_paper_iii(records):
    assert len(records) >= 75 and all(set(r) == FIELDS for r in records)
    quintiles = [r["quintile"] for r in records]
    assert sorted(set(quintiles)) == [0, 1, 2, 3, 4] and all(quintiles.count(q) == 15 for q in range(5))
    assert {r["domain"] for r in records} == DOMAINS
    for q in range(5):  # balanced where the pool allows: no domain takes more than half a quintile
        doms = [r["domain"] for r in records if r["quintile"] == q]
        assert max(doms.count(d) for d in DOMAINS) <= 8
    edges = provenance()["quintile_edges_nats"]
    assert len(edges) == 4 and edges == sorted(edges)
    for r in records:  # each entropy lies in its quintile's bin of the pool
        lo = edges[r["quintile"] - 1] if r["quintile"] > 0 else 0.0
        hi = edges[r["quintile"]] if r["quintile"] < 4 else float("inf")
        assert lo <= r["entropy_nats"] < hi
        assert 32 <= r["n_tokens"] <= 96
    assert len({r["text"] for r in records}) == len(records)


def test_provenance_is_well_formed(records):
    prov = provenance()
    pool = {r["id"]: r for r in read_prompt_records("paper3-smollm2-pool")}
    assert prov["pool_size"] == len(pool) >= 300 and prov["n_prompts"] == len(records)
    for r in records:
        assert re.fullmatch(r"[0-9a-f]{64}", r["sha256"])
        root, _, rel = r["source"].partition(":")
        assert root in ROOTS and rel and not rel.startswith("/")
        assert 0 <= r["byte_start"] < r["byte_end"] and r["python_version"].count(".") == 2 and r["source_license"]
        assert pool[r["id"]] == r  # every prompt is a candidate of the shipped pool, unchanged
        assert prov["sources"][r["source"]]["sha256"] == r["sha256"]


def test_texts_are_the_bytes_of_their_sources_where_this_machine_has_them(records):
    checked = 0
    for r in records:
        root, _, rel = r["source"].partition(":")
        path = ROOTS[root] / rel
        if not path.is_file():
            continue
        data = path.read_bytes()
        if hashlib.sha256(data).hexdigest() != r["sha256"]:
            continue  # another Python or licence version: the hash says so
        assert data[r["byte_start"]:r["byte_end"]].decode("utf-8") == r["text"]
        checked += 1
    if checked == 0:
        pytest.skip("no source file of the set on this machine has the recorded SHA-256 (another Python version)")


def test_usable_by_name_and_errors():
    assert set(PROMPT_SETS) == {"paper3-smollm2", "paper3-smollm2-pool"}
    assert prompt_set_path("paper3-smollm2").is_file()
    texts = read_prompts("paper3-smollm2")
    assert len(texts) == 75 and all(t.strip() for t in texts)
    with pytest.raises(InputError, match="paper3-smollm2"):
        prompt_set_path("paper3-llama")


def test_bad_jsonl_is_refused(tmp_path):
    f = tmp_path / "bad.jsonl"
    f.write_text('{"text": "ok"}\nnot json\n')
    with pytest.raises(InputError, match="line 2 is not JSON"):
        read_prompts(f)
    f.write_text('{"prompt": "no text key"}\n')
    with pytest.raises(InputError, match="no string 'text'"):
        read_prompts(f)


def test_analyze_takes_a_shipped_set_by_name(capsys):
    import argparse

    from bayesmanifold.commands import analyze

    p = argparse.ArgumentParser()
    analyze.add_arguments(p)
    assert p.parse_args(["toy", "--prompts", "paper3-smollm2"]).prompts == "paper3-smollm2"
    with pytest.raises(SystemExit):
        p.parse_args(["toy", "--prompts", "paper3-nothing"])
    assert "does not exist" in capsys.readouterr().err
