"""The shape of the package, read statically from its source (keyred.provenance's import reader):
dependencies point down, entry points come last, light modules stay light, modules and functions
stay short, fla is patched in one place, every stage has one entry point.

The layers, lowest first (a module may import its own layer or lower ones):
  0 core            keyred, config, io, provenance, resources, console, device, specs: no torch
  1 fla names       fla.families, fla.sites, fla.patching: the fla boundary's tables and its one
                    patching tool (they name fla and kernel modules, and import them only by name)
  2 checkpoints     what a checkpoint is, its lineage and the reduction layout (light; loading is fla's)
    kernels         CPU reference kernels (pure torch)
  3 fla adapters    fla.backend (the CPU seam), fla.torch_ops, fla.models (build, load), fla.launch.*
                    (keyred's CUDA launch choices, installed through fla.patching)
  4 domains         data, training, tracking, recall, evaluation, reduction, analysis, bench, figures
  5 entry points    keyred.stages.*, keyred.cli, keyred.__main__ (nothing imports them)
"""
import ast
import importlib
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from keyred.provenance import imported_names

from conftest import REPO

PACKAGE = REPO / "keyred"
MAX_MODULE_LINES = 600
MAX_FUNCTION_LINES = 80
HEAVY = ("torch", "fla", "transformers", "triton", "peft", "lm_eval", "pandas", "matplotlib", "scipy")
# Modules that must import cheaply (no HEAVY package at import time, directly or through what they
# import): the core, the fla boundary's tables, the group arithmetic the Snakefile checks names with,
# the `keyred` command itself. Every keyred module the workflow's Snakefile and rules import is added
# to these (workflow_imports).
LIGHT = ("keyred", "keyred.config", "keyred.io", "keyred.provenance", "keyred.resources", "keyred.console",
         "keyred.device", "keyred.specs", "keyred.fla.families", "keyred.fla.sites", "keyred.data.groups",
         "keyred.cli", "keyred.__main__")
ENTRY_POINTS = ("keyred.cli", "keyred.__main__")
DOMAINS = ("data", "training", "tracking", "recall", "evaluation", "reduction", "analysis", "bench", "figures")


def module_name(file: Path) -> str:
    parts = file.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(file): file for file in sorted(PACKAGE.rglob("*.py"))}


def imports(module: str, module_level: bool = False) -> set[str]:
    """keyred modules that `module` imports (a package __init__ is a module of its own; importing
    keyred.a.b is an edge to keyred.a.b only)."""
    names = imported_names(MODULES[module], module, module_level=module_level)
    return {name for name in names if name in MODULES and name != module}


GRAPH = {module: imports(module) for module in MODULES}


def is_entry_point(module: str) -> bool:
    return module in ENTRY_POINTS or module == "keyred.stages" or module.startswith("keyred.stages.")


def layer(module: str) -> int:
    parts = module.split(".")
    room = parts[1] if len(parts) > 1 else ""
    if is_entry_point(module):
        return 5
    if room in DOMAINS:
        return 4
    if module in ("keyred.fla", "keyred.fla.families", "keyred.fla.sites", "keyred.fla.patching"):
        return 1
    if room == "fla":
        return 3
    if room in ("checkpoints", "kernels"):
        return 2
    return 0


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one node (Tarjan), each sorted."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(node):
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for neighbour in sorted(graph.get(node, ())):
            if neighbour not in index:
                visit(neighbour)
                low[node] = min(low[node], low[neighbour])
            elif neighbour in on_stack:
                low[node] = min(low[node], index[neighbour])
        if low[node] == index[node]:
            component = []
            while not component or component[-1] != node:
                component.append(stack.pop())
                on_stack.discard(component[-1])
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


# ---------------------------------------------------------------------------------------- the graph

def test_the_import_graph_has_no_cycles():
    """Every import counts, also those inside functions: a lazy import is still a dependency."""
    assert cycles(GRAPH) == []


def test_the_domain_packages_depend_on_each_other_without_cycles():
    def room(module):
        parts = module.split(".")
        return parts[1] if len(parts) > 1 and parts[1] in DOMAINS else None

    rooms = {}
    for module, imported in GRAPH.items():
        for other in imported:
            if room(module) and room(other) and room(module) != room(other):
                rooms.setdefault(room(module), set()).add(room(other))
    assert cycles(rooms) == [], rooms


def test_no_library_module_imports_an_entry_point():
    offenders = {module: sorted(filter(is_entry_point, imported)) for module, imported in GRAPH.items()
                 if not is_entry_point(module) and any(map(is_entry_point, imported))}
    assert offenders == {}


def test_dependencies_point_down_the_layers():
    upward = [f"{module} (layer {layer(module)}) imports {other} (layer {layer(other)})"
              for module, imported in sorted(GRAPH.items()) for other in sorted(imported)
              if layer(other) > layer(module)]
    assert not upward, "\n".join(upward)


def workflow_imports() -> set[str]:
    """keyred modules that the Snakefile and the rule files import (when the workflow is parsed)."""
    found = set()
    for file in [REPO / "Snakefile", *sorted((REPO / "workflow" / "rules").glob("*.smk"))]:
        for line in file.read_text().splitlines():
            match = re.match(r"\s*(?:from\s+(keyred[\w.]*)\s+import|import\s+(keyred[\w.]*))", line)
            if match:
                found.add(match[1] or match[2])
    return {module for module in found if module in MODULES}


def module_level_closure(module: str) -> set[str]:
    """`module` and every keyred module importing it runs, with their package __init__s."""
    seen, pending = set(), [module]
    while pending:
        name = pending.pop()
        if name in seen:
            continue
        seen.add(name)
        parent = name.rpartition(".")[0]
        pending += [parent] if parent else []
        pending += sorted(imports(name, module_level=True) - seen)
    return seen


def heavy_imports(module: str) -> set[str]:
    names = imported_names(MODULES[module], module, module_level=True)
    return {name for name in names if name.split(".")[0] in HEAVY}


LIGHT_MODULES = sorted(set(LIGHT) | workflow_imports())


def test_the_workflow_imports_only_light_modules():
    assert {"keyred.config", "keyred.provenance", "keyred.resources", "keyred.specs"} <= workflow_imports()


@pytest.mark.parametrize("module", LIGHT_MODULES)
def test_light_modules_import_nothing_heavy(module):
    heavy = {name: sorted(heavy_imports(name)) for name in sorted(module_level_closure(module)) if heavy_imports(name)}
    assert heavy == {}, f"importing {module} imports {heavy}"


def test_light_modules_import_without_torch_at_run_time():
    """The same, by importing them in a fresh interpreter (catches imports the reader cannot see)."""
    code = (f"import importlib, sys\nfor name in {LIGHT_MODULES!r}: importlib.import_module(name)\n"
            f"print(sorted(name for name in sys.modules if name.split('.')[0] in {HEAVY!r}))")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


# ------------------------------------------------------------------------------------------ sizes

def test_no_module_is_over_600_lines():
    long = {str(file.relative_to(REPO)): lines for file in MODULES.values()
            if (lines := len(file.read_text().splitlines())) > MAX_MODULE_LINES}
    assert long == {}


def test_no_function_is_over_80_lines():
    long = []
    for file in MODULES.values():
        for node in ast.walk(ast.parse(file.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                start = min([node.lineno] + [decorator.lineno for decorator in node.decorator_list])
                lines = node.end_lineno - start + 1
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{file.relative_to(REPO)}:{node.lineno} {node.name} ({lines} lines)")
    assert not long, "\n".join(long)


# --------------------------------------------------------------------------------- one place for each

def test_fla_is_patched_in_one_place():
    """Only keyred.fla.patching replaces names in other modules (setattr on a module or class);
    keyred.fla.families sets fields of a model config it copied."""
    allowed = {("keyred/fla/families.py", "with_key_dim")}
    found = []
    for file in MODULES.values():
        tree = ast.parse(file.read_text())
        for function in ast.walk(tree):
            if not isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(function):
                if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "setattr":
                    where = (str(file.relative_to(REPO)), function.name)
                    if where[0] != "keyred/fla/patching.py" and where not in allowed:
                        found.append(f"{where[0]}:{node.lineno} in {where[1]}")
    assert not found, "setattr outside keyred.fla.patching:\n" + "\n".join(sorted(set(found)))


def has_main_guard(tree: ast.Module) -> bool:
    return any(isinstance(node, ast.If) and "__main__" in ast.unparse(node.test) for node in tree.body)


def test_only_entry_points_have_a_command_line():
    """Library modules hold no argument parser and no `if __name__ == "__main__"` block
    (keyred.console holds the --device and --threads options every stage adds to its parser)."""
    found = []
    for module, file in MODULES.items():
        if is_entry_point(module):
            continue
        tree = ast.parse(file.read_text())
        parses = any(isinstance(node, ast.Attribute) and node.attr == "ArgumentParser" for node in ast.walk(tree))
        if has_main_guard(tree) or (parses and module != "keyred.console"):
            found.append(module)
    assert found == []


def test_every_stage_has_one_entry_point():
    from keyred.cli import STAGES

    assert set(STAGES) == {module.rpartition(".")[2] for module in MODULES if module.startswith("keyred.stages.")}
    for stage in STAGES:
        tree = ast.parse(MODULES[f"keyred.stages.{stage}"].read_text())
        assert ast.get_docstring(tree), f"keyred.stages.{stage} has no docstring (keyred --help shows its first line)"
        assert any(isinstance(node, ast.FunctionDef) and node.name == "main" for node in tree.body), stage
        assert has_main_guard(tree), f"keyred.stages.{stage} does not end with `if __name__ == \"__main__\"`"


# ------------------------------------------------------------------------------------ the keyred command

def keyred(*args, cwd=REPO):
    return subprocess.run([sys.executable, "-m", "keyred", *args], cwd=cwd, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(REPO)})


def test_keyred_help_lists_every_stage_in_one_line_without_importing_them():
    from keyred.cli import STAGES

    result = keyred("--help")
    assert result.returncode == 0, result.stderr
    lines = {line.split()[0]: line for line in result.stdout.splitlines() if line.startswith("  ")}
    for stage in STAGES:
        docstring = ast.get_docstring(ast.parse(MODULES[f"keyred.stages.{stage}"].read_text()))
        first_words = " ".join(docstring.split()[1:4])
        assert re.fullmatch(rf"  {stage} +\S.*", lines[stage]) and first_words.lower() in lines[stage].lower(), stage
    assert keyred().returncode == 2
    code = ("import sys\nfrom keyred.cli import main\nmain(['--help'])\n"
            "print(sorted(name for name in sys.modules if name.startswith('keyred.stages.')))")
    shown = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                           env={**os.environ, "PYTHONPATH": str(REPO)})
    assert shown.stdout.splitlines()[-1] == "[]", shown.stderr


def test_keyred_dispatches_to_the_chosen_stage_only(monkeypatch, capsys):
    from keyred import cli

    imported = []
    real_import = importlib.import_module
    monkeypatch.setattr(cli.importlib, "import_module", lambda name: imported.append(name) or real_import(name))
    with pytest.raises(SystemExit) as exit_code:
        cli.main(["word_problems", "--help"])
    assert exit_code.value.code == 0 and imported == ["keyred.stages.word_problems"]
    assert "usage: keyred word_problems" in capsys.readouterr().out


def test_keyred_runs_a_stage_with_its_exit_code(tmp_path):
    out = tmp_path / "s3.csv"
    made = keyred("word_problems", "--group", "S3", "--length", "4", "--samples", "10", "--out", str(out))
    assert made.returncode == 0, made.stderr
    assert out.read_text().splitlines()[0] == "seed,input,target"
    bad = keyred("word_problems", "--group", "S3xZ2", "--length", "4", "--samples", "10", "--out", str(out))
    assert bad.returncode == 2 and "joined by _x_" in bad.stderr


def test_keyred_refuses_an_unknown_stage_and_a_stage_without_config_mode():
    result = keyred("trian")
    assert result.returncode == 2 and "unknown stage 'trian'" in result.stderr
    result = keyred("word_problems", "--config", "config.yaml")
    assert result.returncode == 2 and "keyred word_problems has no --config mode" in result.stderr


def test_keyred_config_mode_names_what_to_choose():
    result = keyred("train", "--config", "config.yaml")
    assert result.returncode == 2
    assert "--model is needed with --config: the model to run (deltanet_tiny, dp1_tiny, dp2_tiny, dp3_tiny, gated_deltanet_tiny)" in result.stderr
    result = keyred("reduce", "--config", "config.yaml", "--model", "deltanet_tiny", "--method", "svd")
    assert result.returncode == 2 and "--method svd: not a reduction method of the config" in result.stderr
    result = keyred("track", "--config", "config.yaml", "--run", "S3/nh3_pos_L1/seed0")
    assert result.returncode == 2 and "allowed: S3/nh1_pos_L1/seed0, S3/nh1_pos_L1/seed1" in result.stderr
