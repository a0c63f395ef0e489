"""The refusals of a benchmark request (light: no torch)."""

from __future__ import annotations


class BenchmarkError(ValueError):
    """A benchmark request that cannot run as asked (refused before any work)."""


class InsufficientMemoryError(BenchmarkError):
    """A shape that does not fit in the device's memory (estimated before, or out of memory during a run)."""
