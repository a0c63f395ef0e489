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


def test_stale_temporaries_of_an_output_are_removed_when_it_is_written_again(tmp_path):
    """A job killed outright (SIGKILL, SIGTERM without a handler) leaves hidden temporaries; the next
    atomic write of the same output removes them, and only them."""
    stale = [tmp_path / ".table.csv.abcd1234.csv.tmp", tmp_path / ".ckpt.x_y9z012.tmp", tmp_path / ".ckpt.q1w2e3r4.old"]
    stale[0].write_text("half")
    for folder in stale[1:]:
        (folder / "ckpt").mkdir(parents=True)
        (folder / "ckpt" / "model.safetensors").write_bytes(b"half")
    others = [tmp_path / ".table.csv.abcd1234.tmp.keep", tmp_path / ".table.csv.abc.csv.tmp",   # not our pattern
              tmp_path / ".other.csv.abcd1234.csv.tmp", tmp_path / ".table.csv.extra.abcd1234.csv.tmp",
              tmp_path / "table.csv.abcd1234.csv.tmp"]
    for other in others:
        other.write_text("not ours")
    assert io.stale_siblings(tmp_path / "table.csv") == stale[:1]
    io.write_text(tmp_path / "table.csv", "whole")
    assert not stale[0].exists() and stale[1].exists()
    with io.atomic_dir(tmp_path / "ckpt") as tmp:
        (tmp / "config.json").write_text("{}")
    assert not any(path.exists() for path in stale)
    assert all(other.read_text() == "not ours" for other in others)
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".")) == ["ckpt", "table.csv",
                                                                                          "table.csv.abcd1234.csv.tmp"]


def test_a_job_killed_by_sigterm_leaves_temporaries_that_the_retry_removes(tmp_path):
    import subprocess
    import sys
    import time

    target = tmp_path / "big.bin"
    code = ("import sys, time\nfrom keyred import io\nwith io.atomic_file(sys.argv[1]) as tmp:\n"
            "    tmp.write_bytes(b'x' * 1000)\n    print('writing', flush=True)\n    time.sleep(60)\n")
    job = subprocess.Popen([sys.executable, "-c", code, str(target)], stdout=subprocess.PIPE, text=True)
    assert job.stdout.readline().strip() == "writing"
    job.terminate()                                           # SIGTERM: Python's default ends at once
    job.wait(timeout=30)
    left = io.stale_siblings(target)
    assert len(left) == 1 and left[0].stat().st_size == 1000 and not target.exists()
    start = time.perf_counter()
    io.write_text(target, "done")
    assert target.read_text() == "done" and io.stale_siblings(target) == [] and time.perf_counter() - start < 5
    assert [p.name for p in tmp_path.iterdir()] == ["big.bin"]
