"""Resume state of a training run: one file in a resume folder, written atomically every few
steps, read back when the same run starts again, deleted once the run has written its results.

The state records a fingerprint of the run's settings; a state of other settings (or one that
cannot be read) is refused with a ConfigError naming the file and the fix, never silently used.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from keyred import io
from keyred.config import ConfigError

RESUME_FILE = "state.pt"


def load_resume_state(resume_dir: str | Path | None, fingerprint: dict) -> dict | None:
    """The state saved in resume_dir (None when there is none); ConfigError if it is unreadable or
    belongs to other settings."""
    if resume_dir is None or not (Path(resume_dir) / RESUME_FILE).is_file():
        return None
    path = Path(resume_dir) / RESUME_FILE
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as error:                    # truncated, foreign or from an incompatible version
        raise ConfigError(f"{path} is not a readable resume state ({type(error).__name__}: {error}); "
                          f"delete {resume_dir} to start afresh") from None
    if not isinstance(state, dict) or "fingerprint" not in state:
        raise ConfigError(f"{path} is not a keyred resume state; delete {resume_dir} to start afresh")
    if state["fingerprint"] != fingerprint:
        raise ConfigError(f"{path} was written by a run with other settings "
                          f"({state['fingerprint']}); delete {resume_dir} to start afresh")
    return state


def save_resume_state(resume_dir: str | Path, state: dict, fingerprint: dict) -> None:
    """Write `state` (tensors, lists, numbers; picklable) with the fingerprint to resume_dir, atomically."""
    resume_dir = Path(resume_dir)
    resume_dir.mkdir(parents=True, exist_ok=True)
    with io.atomic_file(resume_dir / RESUME_FILE) as tmp:
        torch.save({**state, "fingerprint": fingerprint}, tmp)


def remove_resume_state(resume_dir: str | Path | None) -> None:
    """Delete the resume folder (the run is complete); nothing when there is none."""
    if resume_dir is not None and Path(resume_dir).exists():
        shutil.rmtree(resume_dir)
