"""Atomic outputs: a file or folder appears under its final name only once it is complete.

Everything a stage writes goes through these helpers, so an interrupted job never leaves a
result that looks finished. A job killed outright (SIGKILL, or SIGTERM without a handler) cannot
remove its hidden temporary siblings (`.<name>.XXXXXXXX<suffix>.tmp`, and `.<name>.XXXXXXXX.old`
while a folder is being replaced); the next atomic write of the same output removes them first.
Only names of exactly that pattern are touched (XXXXXXXX: tempfile's 8 random characters), so
the temporaries of other outputs in the same folder are left alone.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Iterator


def _default_mode(base: int) -> int:
    """`base` (0o666 files, 0o777 folders) less the process umask: the mode open()/mkdir() give."""
    umask = os.umask(0)
    os.umask(umask)
    return base & ~umask


def stale_siblings(path: str | Path) -> list[Path]:
    """The temporary siblings that atomic_file / atomic_dir of `path` create, left by a killed job."""
    path = Path(path)
    suffixes = "|".join(sorted({re.escape(f"{path.suffix}.tmp"), re.escape(".tmp"), re.escape(".old")}))
    pattern = re.compile(rf"\.{re.escape(path.name)}\.[a-z0-9_]{{8}}(?:{suffixes})")
    if not path.parent.is_dir():
        return []
    return sorted(sibling for sibling in path.parent.iterdir() if pattern.fullmatch(sibling.name))


def remove_stale_siblings(path: str | Path) -> list[Path]:
    """Delete the temporary siblings of `path` a killed job left behind (files and folders); return them.

    Called when a new atomic write of `path` starts: one job writes one output at a time (Snakemake
    runs one job per output), so a sibling that exists then belongs to an earlier, dead attempt.
    """
    removed = []
    for sibling in stale_siblings(path):
        if sibling.is_dir() and not sibling.is_symlink():
            shutil.rmtree(sibling, ignore_errors=True)
        else:
            sibling.unlink(missing_ok=True)
        removed.append(sibling)
    return removed


def _temporary_sibling(path: Path, suffix: str = "") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_siblings(path)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f"{suffix}.tmp", dir=path.parent)
    os.close(fd)
    os.chmod(name, _default_mode(0o666))  # mkstemp makes 0600; results are for others to read too
    return Path(name)


@contextlib.contextmanager
def atomic_file(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to `path`; rename it onto `path` if the block succeeds."""
    path = Path(path)
    tmp = _temporary_sibling(path, suffix=path.suffix)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield an empty temporary folder; it replaces `path` (whole) if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_siblings(path)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    os.chmod(tmp, _default_mode(0o777))
    try:
        yield tmp
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=path.parent))
            os.replace(path, old / path.name)
            os.replace(tmp, path)
            shutil.rmtree(old)
        else:
            os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def write_text(path: str | Path, text: str) -> None:
    with atomic_file(path) as tmp:
        tmp.write_text(text)


def write_json(path: str | Path, data) -> None:
    write_text(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


def write_csv(path: str | Path, frame) -> None:
    """Write a pandas DataFrame as CSV (no index)."""
    with atomic_file(path) as tmp:
        frame.to_csv(tmp, index=False)
