"""Headless Chromium for the tests: find it, dump a page's DOM after its scripts ran, screenshot it.

Debian's ``chromium`` package (``apt-get install -y chromium``) provides ``chromium``. Tests that
need a browser call :func:`require_chromium`, which skips with the reason when none is installed.
"""

import shutil
import subprocess
from pathlib import Path

import pytest

__all__ = ["find_chromium", "require_chromium", "dump_dom", "screenshot", "png_colour_stats"]

_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
          "--disable-extensions", "--disable-background-networking", "--hide-scrollbars", "--disable-quic",
          "--disable-component-update", "--disable-sync"]


def find_chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        path = shutil.which(name)
        if path:
            return path
    return None


def require_chromium() -> str:
    path = find_chromium()
    if path is None:
        pytest.skip("no headless browser: install Debian's chromium package (apt-get install -y chromium)")
    return path


def _run(args: list[str], profile: Path, timeout: float) -> subprocess.CompletedProcess:
    cmd = [require_chromium(), *_FLAGS, f"--user-data-dir={profile}", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)


def dump_dom(page: Path, profile: Path, timeout: float = 180, fragment: str = "") -> str:
    """The page's DOM after load (scripts ran), as Chromium serialises it (``fragment``: e.g. ``#1.2``)."""
    res = _run(["--virtual-time-budget=5000", "--dump-dom", Path(page).resolve().as_uri() + fragment], profile, timeout)
    assert res.returncode == 0, res.stderr[-2000:]
    return res.stdout


def screenshot(page: Path, png: Path, profile: Path, size: tuple[int, int] = (1300, 1100), timeout: float = 180,
               fragment: str = "") -> Path:
    res = _run([f"--window-size={size[0]},{size[1]}", "--virtual-time-budget=5000", f"--screenshot={png}",
                Path(page).resolve().as_uri() + fragment], profile, timeout)
    assert res.returncode == 0 and Path(png).is_file(), res.stderr[-2000:]
    return Path(png)


def png_colour_stats(png: Path) -> dict[str, int]:
    """Distinct colours, and pixels that are clearly red (r > 150 > g, b) or blue (b > 150 > r)."""
    from PIL import Image

    im = Image.open(png).convert("RGB")
    px = list(im.getdata())
    return {
        "colours": len(set(px)),
        "red": sum(1 for r, g, b in px if r > 150 and g < 110 and b < 110),
        "blue": sum(1 for r, g, b in px if b > 150 and r < 110),
        "pixels": len(px),
    }
