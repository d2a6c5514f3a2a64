"""The README's library example runs as written."""

import re
from pathlib import Path


def test_readme_library_example_runs(capsys):
    text = (Path(__file__).parents[1] / "README.md").read_text(encoding="utf-8")
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    assert blocks, "the README shows a library example"
    exec(compile(blocks[0], "README.md", "exec"), {})
    out = capsys.readouterr().out
    assert float(out.splitlines()[0]) < 1e-10  # the routing law's residual in float64
