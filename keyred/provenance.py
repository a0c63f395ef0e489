"""Which keyred source files a stage depends on, and a digest of their contents.

The Snakefile gives every rule `params: code=code_digest("keyred.stages.<stage>")`, so a rule
re-runs when the source of its stage, or of any keyred module that stage imports (directly or
transitively, found statically), changes, and not when unrelated code changes or files are
merely touched. `imported_names` is the static import reader (tests/test_architecture.py walks
the package's import graph with it).

The rules that run models also get `params: versions=package_versions_digest(...)`, a digest of
the installed releases of torch, triton, fla and transformers (MODEL_PACKAGES, plus the stage's
own, e.g. peft), so an upgrade re-runs what it can change; `hub_commit` resolves a hub revision
to the commit sha that the metadata records. Importing this module is cheap (no torch; the
versions come from importlib.metadata).
"""

from __future__ import annotations

import ast
import hashlib
import re
from functools import lru_cache
from importlib import metadata as importlib_metadata
from pathlib import Path

from keyred.config import ConfigError

PACKAGE_ROOT = Path(__file__).resolve().parent
PACKAGE = PACKAGE_ROOT.name
_MODULE_NAME = re.compile(rf"{PACKAGE}(\.[A-Za-z_][A-Za-z0-9_]*)+")


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


class _Imports(ast.NodeVisitor):
    """Collects the dotted names of import statements; `module_level` leaves out the bodies of
    functions and `if TYPE_CHECKING:` blocks (imports that do not run when the module is imported).
    `named` collects string constants that are a keyred module's full name ("keyred.kernels.layers"):
    modules imported by name at run time (importlib)."""

    def __init__(self, package: str, module_level: bool):
        self.package, self.module_level, self.names, self.named = package, module_level, set(), set()

    def visit_Constant(self, node: ast.Constant) -> None:
        if isinstance(node.value, str) and _MODULE_NAME.fullmatch(node.value):
            self.named.add(node.value)

    def visit_Import(self, node: ast.Import) -> None:
        self.names.update(alias.name for alias in node.names)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        if node.level:
            parts = self.package.split(".")
            prefix = ".".join(parts[: len(parts) - node.level + 1] + ([node.module] if node.module else []))
        else:
            prefix = node.module or ""
        self.names.add(prefix)
        self.names.update(f"{prefix}.{alias.name}" for alias in node.names)

    def visit_FunctionDef(self, node: ast.AST) -> None:
        if not self.module_level:
            self.generic_visit(node)

    visit_AsyncFunctionDef = visit_FunctionDef

    def visit_If(self, node: ast.If) -> None:
        test = node.test
        type_checking = (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or \
            (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")
        if type_checking and self.module_level:
            for statement in node.orelse:
                self.visit(statement)
        else:
            self.generic_visit(node)


def _read(file: Path, module: str, module_level: bool) -> _Imports:
    package = module if file.name == "__init__.py" else module.rpartition(".")[0]
    visitor = _Imports(package, module_level)
    visitor.visit(ast.parse(file.read_text(), filename=str(file)))
    return visitor


def imported_names(file: Path, module: str, *, module_level: bool = False) -> set[str]:
    """Dotted names that the import statements of `file` (the source of `module`) name, keyred's
    and others': `import a.b` gives a.b; `from a import b` gives a and a.b (b may be a module or a
    name defined in a). module_level: only the imports that run when the module is imported."""
    return _read(file, module, module_level).names


def _imported_modules(file: Path, module: str) -> set[str]:
    """keyred names imported anywhere in `file` (inside functions too), or named in a string."""
    visitor = _read(file, module, module_level=False)
    return {name for name in visitor.names if name == PACKAGE or name.startswith(PACKAGE + ".")} | visitor.named


@lru_cache(maxsize=None)
def stage_sources(module: str) -> tuple[Path, ...]:
    """Source files of `module` and every keyred module it imports (or names in a string, to import
    it at run time), transitively (sorted)."""
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


# ------------------------------------------------------------------------ package versions

# The releases a model's numbers and speed depend on (distribution names, as pip spells them).
MODEL_PACKAGES = ("torch", "triton", "flash-linear-attention", "fla-core", "transformers")
NOT_INSTALLED = "not installed"


def package_versions(packages: tuple[str, ...] | list[str] = MODEL_PACKAGES) -> dict[str, str]:
    """{distribution: installed version} (NOT_INSTALLED where it is missing), from importlib.metadata."""
    versions = {}
    for name in packages:
        try:
            versions[name] = importlib_metadata.version(name)
        except importlib_metadata.PackageNotFoundError:
            versions[name] = NOT_INSTALLED
    return versions


def package_versions_digest(*extra: str) -> str:
    """sha256 (16 hex digits) of the installed versions of MODEL_PACKAGES and `extra` (e.g. "peft"):
    a rule param, so that installing another release (or another build: torch 2.13.0+cpu is not
    2.13.0) re-runs the jobs it can change. keyred.json of every checkpoint lists the versions."""
    versions = package_versions(sorted(set(MODEL_PACKAGES) | set(extra)))
    text = ";".join(f"{name}={version}" for name, version in versions.items())
    return hashlib.sha256(text.encode()).hexdigest()[:16]


# ---------------------------------------------------------------------------- hub revisions

_COMMIT_SHA = re.compile(r"[0-9a-f]{40}")


def hub_commit(repo_id: str, revision: str | None, *, repo_type: str = "model", name_key: str,
               revision_key: str) -> str | None:
    """The commit sha that `revision` (a branch, tag or commit; None: main) of the hub repository
    `repo_id` names: a full sha as it is, else asked of the hub (huggingface_hub's repo_info), or,
    offline (HF_HUB_OFFLINE=1 or the hub unreachable), read from the local hub cache, where a
    download records it; None when neither knows it. ConfigError naming the config key of the
    name (`name_key`) or of the revision (`revision_key`) when the hub answers that the repository
    or the revision does not exist."""
    if revision is not None and _COMMIT_SHA.fullmatch(revision):
        return revision
    from huggingface_hub import HfApi, constants
    from huggingface_hub.errors import RepositoryNotFoundError, RevisionNotFoundError

    if not constants.HF_HUB_OFFLINE:
        try:
            return HfApi().repo_info(repo_id, revision=revision, repo_type=repo_type).sha
        except RevisionNotFoundError:
            raise ConfigError(f"config key '{revision_key}': {repo_id} has no revision {revision!r} on the Hub "
                              f"(a branch, tag or commit sha; null is main)") from None
        except RepositoryNotFoundError:
            raise ConfigError(f"config key '{name_key}': there is no {repo_type} {repo_id} on the Hub "
                              f"(or it is private or gated: log in with hf auth login)") from None
        except Exception:                          # offline, unreachable, a server error (httpx's errors are
            pass                                   # no OSError): the cache may still know the revision
    return cached_hub_commit(repo_id, revision, repo_type=repo_type)


def cached_hub_commit(repo_id: str, revision: str | None, *, repo_type: str = "model") -> str | None:
    """The commit sha the local hub cache (HF_HUB_CACHE) records for `revision` of `repo_id`, or None."""
    from huggingface_hub import constants

    folder = f"{repo_type}s--{repo_id.replace('/', '--')}"
    ref = Path(constants.HF_HUB_CACHE) / folder / "refs" / (revision or "main")
    try:
        sha = ref.read_text().strip()
    except OSError:
        return None
    return sha if _COMMIT_SHA.fullmatch(sha) else None
