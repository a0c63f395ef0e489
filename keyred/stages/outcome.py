"""The exit code of a stage's run: what `main` of a training or recovery stage returns.

Not a stage itself: the shared ending of the stages whose work can be refused (a bad input, exit
BAD_INPUT) or stop unfinished (a non-finite loss, exit 1; a stop signal, STOPPED_EXIT_CODE).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from keyred.config import ConfigError
from keyred.console import bad_input
from keyred.training.optimizer import NonFiniteLossError
from keyred.training.resume import TrainingStopped, unfinished_training_exit


def run_stage(work: Callable[[], str], label: str, refused: tuple[type[Exception], ...] = (ConfigError,),
              resume_dir: str | Path | None = None) -> int:
    """Call `work` and print the line it returns (exit 0); an error of `refused` is a bad input
    (keyred.console.bad_input), a non-finite loss or a stop signal goes to unfinished_training_exit
    (`label` prefixes the stop message; `resume_dir` is named as keeping the last good state)."""
    try:
        done = work()
    except refused as error:
        return bad_input(error)
    except (NonFiniteLossError, TrainingStopped) as error:
        return unfinished_training_exit(error, label, resume_dir)
    print(done)
    return 0
