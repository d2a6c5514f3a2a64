"""The report document: findings first, then one section per analysis, written as HTML.

The report is one ``index.html`` with every figure embedded (base64 PNG; no network, opens from
disk), plus ``summary.json`` and the PNGs beside it. The directory is written atomically: built
under a hidden temporary name beside the target, then swapped in, so an interrupted run never
leaves a half-written report under the final name (an older complete report stays in place).
"""

import base64
import html
import io
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import BayesManifoldError
from ..io import _json_default, ensure_dir

__all__ = ["Finding", "Section", "Report", "figure_png", "section"]


@dataclass
class Finding:
    """One claim of the papers, tested: what was measured beside what the paper reports."""

    claim: str
    measured: str
    paper: str
    held: bool | None  # None: reported, no pass/fail criterion
    note: str = ""
    authors_measured: str = ""  # the same claim on the authors' protocol ("" where there is none)
    authors_held: bool | None = None
    authors_note: str = ""


@dataclass
class Section:
    title: str
    how_to_read: str
    figure_png: bytes | None = None
    figure_name: str | None = None
    numbers: dict[str, Any] = field(default_factory=dict)
    table_html: str | None = None


_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#1b1b1b}
h1{margin-bottom:.1em} .sub{color:#555;margin-top:0}
table{border-collapse:collapse;margin:.6em 0;font-size:.92em} th,td{border:1px solid #ddd;padding:.35em .6em;text-align:left}
th{background:#f4f4f4} .ok{color:#0a7d2c;font-weight:600} .no{color:#b3261e;font-weight:600} .na{color:#666}
section{border-top:1px solid #e5e5e5;margin-top:1.6em;padding-top:.6em} img{max-width:100%;height:auto}
.read{background:#f7f9fc;border-left:3px solid #4a78c2;padding:.4em .8em;margin:.5em 0} code{background:#f2f2f2;padding:0 .25em}
"""

_MARK = {True: "<span class='ok'>yes</span>", False: "<span class='no'>no</span>", None: "<span class='na'>reported</span>"}


def figure_png(fig: Any, *, dpi: int = 110, tight: bool = True) -> bytes:
    """Render a matplotlib figure to PNG bytes and close it."""
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, **({"bbox_inches": "tight"} if tight else {}))
    plt.close(fig)
    return buf.getvalue()


def section(
    title: str,
    how_to_read: str,
    *,
    figure: Any = None,
    png: bytes | None = None,
    name: str | None = None,
    numbers: dict[str, Any] | None = None,
    table: Any = None,
) -> Section:
    """A section; ``figure`` is a matplotlib Figure (or ``png`` its bytes), ``table`` a DataFrame."""
    if figure is not None:
        png = figure_png(figure)
    fname = f"{name or _slug(title)}.png" if png is not None else None
    table_html = None
    if table is not None:
        table_html = table.to_html(index=False, float_format=lambda x: f"{x:.4g}", border=0)
    return Section(title, how_to_read, png, fname, dict(numbers or {}), table_html)


class Report:
    """Collect findings and sections, then :meth:`write` them to a directory."""

    def __init__(self, title: str, subtitle: str = "") -> None:
        self.title = title
        self.subtitle = subtitle
        self.claims: list[Finding] = []
        self.sections: list[Section] = []

    def claim(self, claim: str, measured: str, paper: str, held: bool | None, note: str = "") -> None:
        self.claims.append(Finding(claim, measured, paper, held, note))

    def section(self, title: str, how_to_read: str, **kwargs: Any) -> None:
        """Add a section (see :func:`section` for the keyword arguments)."""
        self.sections.append(section(title, how_to_read, **kwargs))

    # ---------------------------------------------------------------- rendering
    def render_html(self) -> str:
        e = html.escape
        parts = [
            "<!doctype html><html lang='en'><head><meta charset='utf-8'>",
            f"<title>{e(self.title)}</title><style>{_CSS}</style></head><body>",
            f"<h1>{e(self.title)}</h1><p class='sub'>{e(self.subtitle)}</p>",
        ]
        if self.claims:
            held = sum(c.held is True for c in self.claims)
            tested = sum(c.held is not None for c in self.claims)
            parts.append(f"<h2>What was tested, and what held ({held} of {tested} checks)</h2>")
            parts.append("<table><tr><th>claim</th><th>paper</th><th>authors' protocol, this model</th><th>held?</th>"
                         "<th>our protocol, this model</th><th>held?</th></tr>")
            for c in self.claims:
                note = f"<br><small>{e(c.note)}</small>" if c.note else ""
                a_note = f"<br><small>{e(c.authors_note)}</small>" if c.authors_note else ""
                a_mark = _MARK[c.authors_held] if c.authors_measured else "—"
                parts.append(f"<tr><td>{e(c.claim)}</td><td>{e(c.paper)}</td><td>{e(c.authors_measured or '—')}{a_note}</td>"
                             f"<td>{a_mark}</td><td>{e(c.measured)}{note}</td><td>{_MARK[c.held]}</td></tr>")
            parts.append("</table>")
        for s in self.sections:
            parts.append(f"<section><h2>{e(s.title)}</h2><div class='read'>{e(s.how_to_read)}</div>")
            if s.figure_png is not None:
                b64 = base64.b64encode(s.figure_png).decode()
                parts.append(f"<img alt='{e(s.title)}' src='data:image/png;base64,{b64}'>")
            if s.numbers:
                parts.append("<table>")
                for k, v in s.numbers.items():
                    parts.append(f"<tr><th>{e(str(k))}</th><td>{e(_fmt(v))}</td></tr>")
                parts.append("</table>")
            if s.table_html:
                parts.append(s.table_html)
            parts.append("</section>")
        parts.append("</body></html>")
        return "\n".join(parts)

    def write(self, out_dir: str | os.PathLike, summary: dict[str, Any]) -> Path:
        """Write ``index.html``, ``summary.json`` and the PNGs to ``out_dir`` atomically."""
        out = Path(out_dir)
        try:
            with _replaced_directory(out) as tmp:
                for s in self.sections:
                    if s.figure_png is not None:
                        (tmp / s.figure_name).write_bytes(s.figure_png)
                (tmp / "summary.json").write_text(json.dumps(summary, indent=2, default=_json_default) + "\n")
                (tmp / "index.html").write_text(self.render_html(), encoding="utf-8")
        except OSError as exc:
            raise BayesManifoldError(f"cannot write the report to {str(out)!r}: {exc.strerror or exc}") from None
        return out


def check_replaceable(out: "str | os.PathLike") -> None:
    """Raise unless ``out`` may be replaced by a report: it does not exist, is empty, or holds only
    what a report writes (index.html, summary.json, figures). A directory with anything else in it
    (``--out .``, a home directory, a scan) is never deleted."""
    d = Path(out)
    if not d.is_dir():
        return
    foreign = sorted(p.name for p in d.iterdir()
                     if not (p.is_file() and (p.name in ("index.html", "summary.json") or p.suffix == ".png")))
    if foreign:
        shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
        raise BayesManifoldError(f"report directory {str(out)!r} exists and holds files a report does not write ({shown}); "
                                 "it is replaced as a whole, so give a new directory or an earlier report's")


@contextmanager
def _replaced_directory(out: Path) -> Iterator[Path]:
    """Yield a temporary directory beside ``out``; on success it replaces ``out`` (an older one is
    removed only after the swap), on any error or interrupt it is removed and ``out`` is untouched."""
    check_replaceable(out)
    parent = ensure_dir(out.parent if str(out.parent) else ".")
    if out.exists() and not out.is_dir():
        raise BayesManifoldError(f"report path {str(out)!r} exists and is not a directory")
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=parent))
    try:
        tmp.chmod(0o755)  # mkdtemp makes 0700; a report is meant to be read
        yield tmp
        old = None
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=parent))
            os.replace(out, old / "report")
        os.replace(tmp, out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _slug(s: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in s.lower()).strip("_")[:40] or "figure"


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, list | tuple) and v and all(isinstance(x, float) for x in v):
        return "[" + ", ".join(f"{x:.3g}" for x in v) + "]"
    return str(v)
