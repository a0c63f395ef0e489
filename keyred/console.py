"""What every stage's command line shares: the --spec JSON, the exit code of a bad input, the
--device and --threads options, and progress lines that reach a log file at once."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

BAD_INPUT = 2          # exit code of a stage that refused its input before any expensive work
DEVICES = ("auto", "cpu", "cuda")   # --device (and the config's device): auto = cuda when a GPU is visible


def progress(message: str) -> None:
    """Print a progress line and flush it (stage logs are files, block-buffered otherwise)."""
    print(message, flush=True)


def read_spec(parser: argparse.ArgumentParser, text: str) -> Any:
    """The --spec JSON; an argparse error (exit 2) naming the problem when it is not valid JSON."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        parser.error(f"--spec is not valid JSON: {error}")


def bad_input(error: Exception) -> int:
    """Report a refused input on stderr as 'error: ...'; return the exit code BAD_INPUT."""
    print(f"error: {error}", file=sys.stderr)
    return BAD_INPUT


def add_torch_options(parser: argparse.ArgumentParser) -> None:
    """--device (auto, cpu, cuda) and --threads (torch CPU threads), read by keyred.device.torch_device."""
    parser.add_argument("--device", default="auto", choices=DEVICES)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
