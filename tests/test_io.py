"""Atomic outputs: complete or absent, with ordinary permissions."""
import os
import stat

import pytest

from keyred import io


def test_file_appears_only_when_complete(tmp_path):
    target = tmp_path / "table.csv"
    with pytest.raises(RuntimeError):
        with io.atomic_file(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("interrupted")
    assert list(tmp_path.iterdir()) == []
    io.write_text(target, "whole")
    assert target.read_text() == "whole" and [p.name for p in tmp_path.iterdir()] == ["table.csv"]


def test_folder_is_replaced_whole(tmp_path):
    target = tmp_path / "ckpt"
    with io.atomic_dir(target) as tmp:
        (tmp / "a").write_text("1")
    with pytest.raises(RuntimeError):
        with io.atomic_dir(target) as tmp:
            (tmp / "b").write_text("2")
            raise RuntimeError("interrupted")
    assert [p.name for p in target.iterdir()] == ["a"]
    with io.atomic_dir(target) as tmp:
        (tmp / "c").write_text("3")
    assert [p.name for p in target.iterdir()] == ["c"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_outputs_get_the_umask_permissions(tmp_path):
    old = os.umask(0o022)
    try:
        io.write_text(tmp_path / "f.txt", "x")
        with io.atomic_dir(tmp_path / "d"):
            pass
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "f.txt").stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "d").stat().st_mode) == 0o755
