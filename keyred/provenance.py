"""Which keyred source files a stage depends on, and a digest of their contents.

The Snakefile gives every rule `params: code=code_digest("keyred.<stage>")`, so a rule re-runs
when the source of its stage, or of any keyred module that stage imports (directly or
transitively, found statically), changes, and not when unrelated code changes or files are
merely touched. Importing this module is cheap (no torch).
"""

from __future__ import annotations

import ast
import hashlib
from functools import lru_cache
from pathlib import Path

PACKAGE_ROOT = Path(__file__).resolve().parent
PACKAGE = PACKAGE_ROOT.name


def module_file(module: str) -> Path:
    """Path of a keyred module ('keyred.kernels.layers' -> .../keyred/kernels/layers.py)."""
    parts = module.split(".")
    if parts[0] != PACKAGE:
        raise ValueError(f"{module} is not a {PACKAGE} module")
    base = PACKAGE_ROOT.joinpath(*parts[1:])
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    raise ModuleNotFoundError(f"no source file for {module}")


def _imported_modules(file: Path, module: str) -> set[str]:
    """keyred modules named by import statements anywhere in `file`."""
    found: set[str] = set()
    package = module if file.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(file.read_text(), filename=str(file))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                prefix = ".".join(base + ([node.module] if node.module else []))
            else:
                prefix = node.module or ""
            names = [prefix] + [f"{prefix}.{alias.name}" for alias in node.names]
        else:
            continue
        for name in names:
            if name == PACKAGE or name.startswith(PACKAGE + "."):
                found.add(name)
    return found


@lru_cache(maxsize=None)
def stage_sources(module: str) -> tuple[Path, ...]:
    """Source files of `module` and every keyred module it imports, transitively (sorted)."""
    seen: dict[str, Path] = {}
    pending = [module]
    while pending:
        name = pending.pop()
        if name in seen:
            continue
        try:
            file = module_file(name)
        except ModuleNotFoundError:
            continue  # `from keyred.x import function` also yields 'keyred.x.function'
        seen[name] = file
        # a module's package __init__ runs on import too
        parent = name.rpartition(".")[0]
        if parent:
            pending.append(parent)
        pending.extend(_imported_modules(file, name) - seen.keys())
    return tuple(sorted(set(seen.values())))


def code_digest(module: str) -> str:
    """sha256 over the relative paths and contents of `stage_sources(module)` (16 hex digits)."""
    digest = hashlib.sha256()
    for file in stage_sources(module):
        digest.update(str(file.relative_to(PACKAGE_ROOT)).encode())
        digest.update(file.read_bytes())
    return digest.hexdigest()[:16]
