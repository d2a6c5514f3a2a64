"""Atomic writes: nothing half-written under the final name, usual permissions."""

import os
import stat

import pytest

from bayesmanifold.errors import BayesManifoldError
from bayesmanifold.io import atomic_write, atomic_write_json, ensure_dir


def test_atomic_write_leaves_old_file_on_failure(tmp_path):
    target = tmp_path / "out.json"
    atomic_write_json(target, {"a": 1})

    def boom(p):
        p.write_text("partial")
        raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError):
        atomic_write(target, boom)
    assert target.read_text().strip().startswith("{")
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]  # no temporary left behind


def test_permissions_follow_umask(tmp_path):
    target = atomic_write_json(tmp_path / "x.json", [1])
    mode = stat.S_IMODE(os.stat(target).st_mode)
    mask = os.umask(0)
    os.umask(mask)
    assert mode == 0o666 & ~mask


def test_unwritable_directory(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(BayesManifoldError, match="not a directory"):
        ensure_dir(f)
