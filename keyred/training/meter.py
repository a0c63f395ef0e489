"""How fast a training loop goes: tokens per second over the steps since the last reading,
time elapsed, and the estimated time to the last step, as numbers for the log rows and as the
tail of a progress line."""

from __future__ import annotations

import dataclasses
import time


@dataclasses.dataclass(frozen=True)
class Reading:
    """One look at the meter after step `done`."""

    done: int
    tokens_per_s: float
    elapsed_s: float
    eta_s: float

    def text(self) -> str:
        """The end of a progress line: '12,345 tok/s elapsed 10s eta 90s'."""
        return f"{self.tokens_per_s:,.0f} tok/s elapsed {self.elapsed_s:.0f}s eta {self.eta_s:.0f}s"


class Meter:
    """Counts the tokens of steps first_step + 1 .. total_steps as they are taken.

    Throughput is measured over a window (the steps since the last `restart_window`, so that
    validation between two readings does not count); elapsed time includes `elapsed_before` (the
    training time of an earlier, resumed part of the run); the ETA extrapolates the mean step
    time of this part of the run.
    """

    def __init__(self, total_steps: int, first_step: int = 0, elapsed_before: float = 0.0):
        self.total_steps, self.first_step, self.elapsed_before = total_steps, first_step, elapsed_before
        self.start = self.window_start = self.last_line = time.perf_counter()
        self.window_tokens = 0

    def count(self, tokens: int) -> None:
        """Add the tokens of one step to the current window."""
        self.window_tokens += tokens

    def elapsed(self) -> float:
        """Training seconds so far, the earlier part of a resumed run included."""
        return self.elapsed_before + time.perf_counter() - self.start

    def reading(self, done: int) -> Reading:
        """The meter after `done` steps (of total_steps)."""
        now = time.perf_counter()
        run = now - self.start
        eta = run / max(1, done - self.first_step) * (self.total_steps - done)
        return Reading(done=done, tokens_per_s=self.window_tokens / (now - self.window_start),
                       elapsed_s=self.elapsed_before + run, eta_s=eta)

    def restart_window(self) -> None:
        """Start a new throughput window now (after a reading was logged)."""
        self.window_start, self.window_tokens = time.perf_counter(), 0

    def line_due(self, seconds: float) -> bool:
        """True at most once per `seconds`: time for a progress line between readings."""
        if time.perf_counter() - self.last_line < seconds:
            return False
        self.last_line = time.perf_counter()
        return True
