"""Where a stage runs: the device name, torch's CPU threads and the autocast every stage shares.

Core module: torch is imported inside the functions, so importing this one stays cheap.
"""

from __future__ import annotations

from keyred.config import ConfigError


def resolve_device(device: str) -> str:
    """'auto' -> 'cuda' when a GPU is visible, else 'cpu'; ConfigError if 'cuda' is asked for and missing."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("config key 'device': cuda was asked for but no CUDA GPU is visible; use cpu or auto")
    return device


def torch_device(device: str, threads: int | None) -> str:
    """Set torch's CPU threads (when given) and resolve the --device option (see resolve_device)."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    return resolve_device(device)


def mixed_precision(device: str):
    """The autocast context of every keyred stage: bf16 on CUDA (fla's chunk kernels reject
    float32), none on CPU (float32)."""
    import torch

    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=device == "cuda")
