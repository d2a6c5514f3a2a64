"""Prompt sets shipped with the package, usable by name wherever a prompts file is accepted.

``paper3-smollm2``: Paper III's stratified prompt set (arXiv 2512.23752, PAPERS.md §5) built for
SmolLM2-135M from offline text of the Python 3.11 standard library and the Debian licence texts:
75 prompts, 15 per quintile of SmolLM2's next-token entropy at the final token, balanced over
four domains (code, documentation, licence, prose). ``paper3-smollm2-pool``: every candidate it
was drawn from, with its entropy. Each record is one JSON object per line::

    {"id", "text", "domain", "source", "byte_start", "byte_end", "sha256", "python_version",
     "source_license", "n_tokens", "entropy_nats", "quintile"}

``text`` is exactly ``bytes[byte_start:byte_end]`` of the source file (``source`` is
``stdlib:<path under the stdlib>`` or ``common-licenses:<name>``) whose SHA-256 is ``sha256``.
The build's settings (seed, pool size, quintile edges, counts) are in
``paper3_prompts_smollm2.provenance.json``; ``examples/build_paper3_prompts.py`` rebuilds both.
"""

import json
from importlib import resources
from pathlib import Path
from typing import Any

from ..errors import InputError

__all__ = ["PROMPT_SETS", "prompt_set_path", "read_prompt_records", "provenance"]

#: name -> file inside this package
PROMPT_SETS = {
    "paper3-smollm2": "paper3_prompts_smollm2.jsonl",
    "paper3-smollm2-pool": "paper3_prompts_smollm2_pool.jsonl",
}
PROVENANCE = "paper3_prompts_smollm2.provenance.json"


def _file(name: str) -> Path:
    return Path(str(resources.files(__name__).joinpath(name)))


def prompt_set_path(name: str) -> Path:
    """The file of a shipped prompt set (see :data:`PROMPT_SETS`)."""
    if name not in PROMPT_SETS:
        raise InputError(f"no shipped prompt set named {name!r}; shipped: {', '.join(PROMPT_SETS)}")
    return _file(PROMPT_SETS[name])


def read_prompt_records(path: str | Path) -> list[dict[str, Any]]:
    """The records of a JSONL prompts file (or a shipped set's name): one object with ``text`` per line."""
    p = prompt_set_path(str(path)) if str(path) in PROMPT_SETS else Path(path)
    if not p.is_file():
        raise InputError(f"prompts file {str(p)!r} does not exist")
    records = []
    for i, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise InputError(f"{p}: line {i} is not JSON ({e.msg}); a .jsonl prompts file holds one object with a 'text' per line") from None
        if isinstance(rec, str):
            rec = {"text": rec}
        if not isinstance(rec, dict) or not isinstance(rec.get("text"), str):
            raise InputError(f"{p}: line {i} has no string 'text'; a .jsonl prompts file holds one object with a 'text' per line")
        records.append(rec)
    if not records:
        raise InputError(f"prompts file {str(p)!r} holds no record")
    return records


def provenance() -> dict[str, Any]:
    """The build settings of ``paper3-smollm2`` (seed, pool, quintile edges, counts, sources)."""
    return json.loads(_file(PROVENANCE).read_text(encoding="utf-8"))
