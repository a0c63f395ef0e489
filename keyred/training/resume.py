"""Resume state of a training run: one file in a resume folder, written atomically every few
steps, read back when the same run starts again, deleted once the run has written its results.

The state records a fingerprint of the run's settings; a state of other settings is refused with
a ConfigError naming the file and the fix, never silently used. A state that cannot be read
(truncated, corrupt, not keyred's) is set aside as `state.pt.corrupt` with a warning naming both
files, and the run starts afresh: a retry (Snakemake's, SLURM's) then succeeds instead of failing
the same way every time, and the file is kept for inspection.

Beside the state, the folder holds the run's metric rows as they are logged (`rows.csv`,
`RowsFile`: appended and flushed row by row, so a killed run leaves every row it logged; the
run's final table is still written atomically at the end). A run resumed from a state rewrites
the file with the state's rows first, so it never holds a row twice.

Stopping on a signal (`StopSignals`): while a loop runs with a resume folder, SIGUSR1 and
SIGTERM (what SLURM sends before and at the wall time) only mark a stop as requested; the loop
saves its state at the next step boundary and raises `TrainingStopped`, and the stage exits with
STOPPED_EXIT_CODE, so Snakemake sees a failed job and its retry resumes from that step.
`run_stage` maps a training stage's outcome (done, refused input, non-finite loss, stop) to its
exit code.
"""

from __future__ import annotations

import csv
import os
import shutil
import signal
import sys
import threading
from collections.abc import Callable
from pathlib import Path

import torch

from keyred import io
from keyred.config import ConfigError
from keyred.console import bad_input
from keyred.training.optimizer import NonFiniteLossError

RESUME_FILE = "state.pt"
CORRUPT_SUFFIX = ".corrupt"    # an unreadable state is renamed to state.pt.corrupt
ROWS_FILE = "rows.csv"
STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)
STOPPED_EXIT_CODE = 75         # EX_TEMPFAIL: stopped by a signal with its state saved; run it again to continue


class TrainingStopped(Exception):
    """A stop signal arrived; the resume state of `step` is saved in `resume_dir`."""

    def __init__(self, signal_name: str, step: int, resume_dir: str | Path):
        super().__init__(f"{signal_name} received: stopped after step {step} with its resume state saved in "
                         f"{Path(resume_dir) / RESUME_FILE}; run the same command again to continue from there")
        self.signal_name, self.step, self.resume_dir = signal_name, step, resume_dir


class StopSignals:
    """While active (a `with` block), SIGUSR1 and SIGTERM set `requested` to the signal's name
    instead of ending the process; the handlers found are put back at the end. Inactive
    (active=False, or not in the main thread, where Python cannot install handlers) it changes
    nothing and `requested` stays None."""

    def __init__(self, active: bool = True):
        self.active = active and threading.current_thread() is threading.main_thread()
        self.requested: str | None = None
        self._previous: dict = {}

    def _handle(self, number, frame) -> None:
        self.requested = signal.Signals(number).name

    def __enter__(self) -> StopSignals:
        if self.active:
            self._previous = {number: signal.signal(number, self._handle) for number in STOP_SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler)
        self._previous = {}


class ForwardStopSignals(StopSignals):
    """StopSignals for a process that waits for `child` (e.g. torchrun and its workers): a stop
    signal is passed on to the child as SIGTERM (torchrun passes that on to every worker)."""

    def __init__(self, child):
        super().__init__()
        self.child = child

    def _handle(self, number, frame) -> None:
        super()._handle(number, frame)
        if self.child.poll() is None:
            self.child.send_signal(signal.SIGTERM)


class RowsFile:
    """The metric rows of a run as a CSV in its resume folder (ROWS_FILE), one line per row,
    flushed to disk as each is added. Opening it writes `rows` (those of the resumed state, or
    none) atomically; its columns are those of the first row. Without a folder it does nothing."""

    def __init__(self, resume_dir: str | Path | None, rows: list[dict]):
        self.path = None if resume_dir is None else Path(resume_dir) / ROWS_FILE
        self.columns: list[str] | None = list(rows[0]) if rows else None
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with io.atomic_file(self.path) as tmp, open(tmp, "w", newline="") as file:
            if rows:
                writer = csv.DictWriter(file, fieldnames=self.columns)
                writer.writeheader()
                writer.writerows(rows)

    def append(self, row: dict) -> None:
        """Add one row (the same keys as the first) and flush it to disk."""
        if self.path is None:
            return
        with open(self.path, "a", newline="") as file:
            writer = csv.DictWriter(file, fieldnames=self.columns or list(row))
            if self.columns is None:
                self.columns = list(row)
                writer.writeheader()
            writer.writerow(row)
            file.flush()
            os.fsync(file.fileno())


def _warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr, flush=True)


def set_aside(path: Path, problem: str, log=_warn) -> None:
    """Rename an unreadable resume state to `<name>.corrupt` (replacing an older one) and say so."""
    aside = path.with_name(path.name + CORRUPT_SUFFIX)
    try:
        os.replace(path, aside)
    except FileNotFoundError:                     # another process of the same run set it aside first
        return
    log(f"{path} is not a readable resume state ({problem}); set aside as {aside}, starting afresh "
        f"(delete {aside} when it is not needed)")


def load_resume_state(resume_dir: str | Path | None, fingerprint: dict, log=_warn) -> dict | None:
    """The state saved in resume_dir (None when there is none, or when it was unreadable and has just
    been set aside: set_aside); ConfigError if it belongs to other settings."""
    if resume_dir is None or not (Path(resume_dir) / RESUME_FILE).is_file():
        return None
    path = Path(resume_dir) / RESUME_FILE
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as error:                    # truncated, foreign or from an incompatible version
        set_aside(path, f"{type(error).__name__}: {' '.join(str(error).split())}", log)
        return None
    if not isinstance(state, dict) or "fingerprint" not in state:
        set_aside(path, "not a keyred resume state", log)
        return None
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


def unfinished_training_exit(error: NonFiniteLossError | TrainingStopped, label: str,
                             resume_dir: str | Path | None = None) -> int:
    """What a stage prints and returns when its training loop did not finish: a non-finite loss is
    an error (exit 1; `resume_dir`, when given, is named as keeping the last good state), a stop
    signal is `label: <what was saved>` (STOPPED_EXIT_CODE, so the retry resumes)."""
    if isinstance(error, TrainingStopped):
        print(f"{label} {error}", file=sys.stderr)
        return STOPPED_EXIT_CODE
    kept = f"; the last good state is kept in {resume_dir}" if resume_dir else ""
    print(f"error: {error}{kept}", file=sys.stderr)
    return 1


def run_stage(work: Callable[[], str], label: str, refused: tuple[type[Exception], ...] = (ConfigError,),
              resume_dir: str | Path | None = None) -> int:
    """A training stage's exit code: call `work` and print the line it returns (0); an error of
    `refused` is a bad input (keyred.console.bad_input), a non-finite loss or a stop signal goes
    to unfinished_training_exit (`label` prefixes the stop message, `resume_dir` is named as
    keeping the last good state)."""
    try:
        done = work()
    except refused as error:
        return bad_input(error)
    except (NonFiniteLossError, TrainingStopped) as error:
        return unfinished_training_exit(error, label, resume_dir)
    print(done)
    return 0
