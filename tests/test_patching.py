"""keyred.fla.patching and keyred.fla.sites: fla is patched in one place, from one table.

patched() puts back exactly what it found (also a staticmethod, also an inherited method), in
reverse order, also when the block raises, and nested blocks unwind correctly; install() changes
nothing when a site is missing or a wrap fails. A static scan of keyred's source finds no module
other than keyred/fla/patching.py that sets an attribute of an fla module or class. The table
agrees with the family registry, and the light modules stay light.
"""

from __future__ import annotations

import ast
import functools
import subprocess
import sys
import types
from pathlib import Path

import pytest

from keyred.fla.families import FAMILIES, REGISTRY
from keyred.fla.patching import UnsupportedFlaError, current, install, patched
from keyred.fla.sites import CHUNK_LAUNCH_SITES, CPU_SITES, DECODE_LAUNCH_SITE, DELTA_RULE_OPS, SITES, Site

REPO = Path(__file__).resolve().parent.parent
FAKE = "keyred_test_fake_fla"
OP, OTHER = Site(FAKE, "op"), Site(FAKE, "other")


def original_op(x):
    return x + 1


def other_op(x):
    return x * 2


class Base:
    def method(self):
        return "base"


class Child(Base):
    pass


class Loss:
    @staticmethod
    def forward(x):
        return -x


@pytest.fixture
def fake(monkeypatch):
    """A stand-in for an fla module (op, other, Child inheriting method, Loss.forward a staticmethod)."""
    module = types.ModuleType(FAKE)
    module.op, module.other, module.Child, module.Loss = original_op, other_op, Child, Loss
    monkeypatch.setitem(sys.modules, FAKE, module)
    yield module
    assert "method" not in vars(Child)


def tagged(tag: str):
    """A wrap that records (tag, what it wrapped) and calls through."""
    def wrap(site, previous):
        @functools.wraps(previous)
        def wrapper(*args, **kwargs):
            return previous(*args, **kwargs)
        wrapper.tag = tag
        return wrapper
    return wrap


# ----------------------------------------------------------------------------------- patched

def test_patched_restores_exactly_what_it_found(fake):
    raw_forward = vars(Loss)["forward"]
    sites = (OP, OTHER, Site(FAKE, "Loss.forward"), Site(FAKE, "Child.method"))
    with patched(sites, tagged("a")):
        assert fake.op.tag == "a" and fake.op.__wrapped__ is original_op and fake.op(1) == 2
        assert fake.other.__wrapped__ is other_op
        assert Loss.forward.__wrapped__(3) == -3
        assert Child().method() == "base" and "method" in vars(Child)
    assert fake.op is original_op and fake.other is other_op
    assert vars(Loss)["forward"] is raw_forward, "the staticmethod itself comes back"
    assert "method" not in vars(Child) and Child.method is Base.method, "an inherited name is inherited again"


def test_patched_restores_in_reverse_order(fake):
    with patched((OP, OP), tagged("twice")):                # the second wraps the first
        assert fake.op.__wrapped__.__wrapped__ is original_op
    assert fake.op is original_op                           # forward-order undo would leave the first wrapper


def test_patched_restores_when_the_block_raises(fake):
    with pytest.raises(KeyError, match="boom"), patched((OP, OTHER), tagged("a")):
        assert fake.op is not original_op
        raise KeyError("boom")
    assert fake.op is original_op and fake.other is other_op


def test_nested_blocks_unwind_to_what_each_found(fake):
    with patched((OP,), tagged("outer")):
        outer = fake.op
        with patched((OP, OTHER), tagged("inner")):
            assert fake.op.tag == "inner" and fake.op.__wrapped__ is outer
            assert fake.op(1) == 2
        assert fake.op is outer and fake.other is other_op
    assert fake.op is original_op


def test_a_missing_site_or_a_failing_wrap_changes_nothing(fake):
    with pytest.raises(UnsupportedFlaError, match=rf"{FAKE}\.missing, which does not exist"):
        install((OP, Site(FAKE, "missing")), tagged("a"))
    assert fake.op is original_op
    with pytest.raises(UnsupportedFlaError, match=r"no_such_module_xyz cannot be imported"):
        install((OP, Site("no_such_module_xyz", "op")), tagged("a"))

    def fails_on_other(site, previous):
        if site is OTHER:
            raise RuntimeError("cannot wrap")
        return tagged("a")(site, previous)

    with pytest.raises(RuntimeError, match="cannot wrap"), patched((OP, OTHER), fails_on_other):
        pass
    assert fake.op is original_op and fake.other is other_op
    assert current(OP) is original_op


# ------------------------------------------------------------------------------ the table

def test_every_site_says_what_keyred_does_there():
    for site in SITES:
        roles = [bool(site.cpu), bool(site.refuse), bool(site.family) or site.chunk_launch, site.decode_launch]
        assert roles[0] + roles[1] <= 1 and any(roles), site
        assert site.module.startswith("fla.") and (site.refuse is None) == (site.refused_in is None), site
    assert len(set(SITES)) == len(SITES)
    assert all(site.cpu for site in DELTA_RULE_OPS), "every delta-rule op also runs off the GPU"
    assert set(CHUNK_LAUNCH_SITES) <= set(DELTA_RULE_OPS) and DECODE_LAUNCH_SITE not in CPU_SITES


@pytest.mark.parametrize("family", FAMILIES)
def test_delta_rule_ops_live_in_the_family_layer_module(family):
    ops = [site for site in DELTA_RULE_OPS if site.family == family]
    assert {site.module for site in ops} == {REGISTRY[family].layer_module}
    assert sorted(site.attribute.split("_")[0] for site in ops) == ["chunk", "fused"]


def test_the_fla_boundary_tables_import_neither_torch_nor_fla():
    code = ("import sys, keyred.fla.sites, keyred.fla.families, keyred.fla.patching; "
            "print(sorted(m for m in ('torch', 'fla', 'transformers') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    assert result.stdout.strip() == "[]"


# ---------------------------------------------------------------------------- static scan

_PASS_THROUGH = {"reversed", "list", "tuple", "zip", "iter", "sorted", "enumerate", "getattr", "vars", "next"}


class _FlaTaint:
    """Names of a module's source bound (statically) to fla modules or classes, or to containers
    of them: imports of fla, importlib.import_module(...), and whatever is assigned, iterated,
    appended or returned from those. Instances made by calling a class are not fla objects."""

    def __init__(self, tree: ast.Module):
        self.names: set[str] = set()
        self.functions: set[str] = set()      # defined here, returning fla objects
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                self.names.update((alias.asname or alias.name).split(".")[0] for alias in node.names
                                  if alias.name.split(".")[0] == "fla")
            elif isinstance(node, ast.ImportFrom) and not node.level and (node.module or "").split(".")[0] == "fla":
                self.names.update(alias.asname or alias.name for alias in node.names)
        while self._propagate(tree):
            pass

    def tainted(self, node: ast.AST | None) -> bool:
        if node is None:
            return False
        if isinstance(node, ast.Name):
            return node.id in self.names
        if isinstance(node, (ast.Attribute, ast.Subscript, ast.Starred)):
            return self.tainted(node.value)
        if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
            return any(self.tainted(element) for element in node.elts)
        if isinstance(node, ast.Dict):
            return any(self.tainted(value) for value in node.values)
        if isinstance(node, (ast.ListComp, ast.SetComp, ast.GeneratorExp, ast.DictComp)):
            return self.tainted(getattr(node, "elt", None) or node.value) or any(
                self.tainted(generator.iter) for generator in node.generators)
        if isinstance(node, ast.IfExp):
            return self.tainted(node.body) or self.tainted(node.orelse)
        if isinstance(node, ast.Call):
            name = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", None)
            if name in ("import_module", "__import__"):
                return True
            if name in _PASS_THROUGH or name in ("items", "values"):
                return any(self.tainted(arg) for arg in node.args) or (
                    isinstance(node.func, ast.Attribute) and self.tainted(node.func.value))
            return isinstance(node.func, ast.Name) and node.func.id in self.functions
        return False

    def _bind(self, target: ast.AST) -> bool:
        """Taint the names `target` binds (a subscript or method receiver: its container's name)."""
        new = set(_bound_names(target)) - self.names
        self.names |= new
        return bool(new)

    def _propagate(self, tree: ast.Module) -> bool:
        changed = False
        for node in ast.walk(tree):
            if isinstance(node, ast.Assign) and self.tainted(node.value):
                changed |= any([self._bind(target) for target in node.targets])
            elif isinstance(node, (ast.AnnAssign, ast.NamedExpr)) and self.tainted(node.value):
                changed |= self._bind(node.target)
            elif isinstance(node, (ast.For, ast.comprehension)) and self.tainted(node.iter):
                changed |= self._bind(node.target)
            elif isinstance(node, ast.withitem) and node.optional_vars is not None and self.tainted(node.context_expr):
                changed |= self._bind(node.optional_vars)
            elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                  and node.func.attr in ("append", "extend", "add", "insert")
                  and any(self.tainted(arg) for arg in node.args)):
                changed |= self._bind(node.func.value)
            elif isinstance(node, ast.FunctionDef) and node.name not in self.functions and any(
                    self.tainted(n.value) for n in ast.walk(node) if isinstance(n, ast.Return)):
                self.functions.add(node.name)
                changed = True
        return changed


def _bound_names(target: ast.AST) -> list[str]:
    if isinstance(target, ast.Name):
        return [target.id]
    if isinstance(target, (ast.Tuple, ast.List)):
        return [name for element in target.elts for name in _bound_names(element)]
    if isinstance(target, (ast.Starred, ast.Subscript)):
        return _bound_names(target.value)
    return []                                       # an attribute: x.a = fla_thing does not make x fla's


def fla_patches(source: str) -> list[int]:
    """Line numbers where `source` sets or deletes an attribute of an fla module or class."""
    tree = ast.parse(source)
    taint = _FlaTaint(tree)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            name = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", None)
            if name in ("setattr", "delattr", "__setattr__", "__delattr__") and node.args and taint.tainted(node.args[0]):
                found.append(node.lineno)
        elif isinstance(node, (ast.Assign, ast.AugAssign, ast.AnnAssign, ast.Delete)):
            targets = node.targets if isinstance(node, (ast.Assign, ast.Delete)) else [node.target]
            for target in targets:
                for part in ast.walk(target):
                    if isinstance(part, (ast.Attribute, ast.Subscript)) and taint.tainted(part.value) and (
                            isinstance(part, ast.Attribute) or _is_namespace(part.value)):
                        found.append(node.lineno)
    return sorted(set(found))


def _is_namespace(node: ast.AST) -> bool:
    """vars(x) or x.__dict__: item assignment there sets an attribute of x."""
    return (isinstance(node, ast.Call) and getattr(node.func, "id", None) == "vars") or (
        isinstance(node, ast.Attribute) and node.attr == "__dict__")


@pytest.mark.parametrize("source, lines", [
    ("import fla.layers.delta_net as m\nm.chunk_delta_rule = f\n", [2]),
    ("from fla.modules import RMSNorm\nRMSNorm.forward = f\n", [2]),
    ("import fla\ndel fla.layers.x\n", [2]),
    ("import importlib\nmodule = importlib.import_module(name)\nsetattr(module, 'op', f)\n", [3]),
    ("import importlib\nsaved = []\nfor n in names:\n    saved.append((importlib.import_module(n), 'x'))\n"
     "for module, name in reversed(saved):\n    setattr(module, name, 1)\n", [6]),
    ("import importlib\ndef owner():\n    return importlib.import_module('fla.x')\nvars(owner())['op'] = f\n", [4]),
    ("def with_key_dim(config):\n    setattr(config, 'head_dim', 8)\n", []),
    ("import fla.models as fm\nconfig = fm.DeltaNetConfig()\nconfig.expand_k = 0.5\nsetattr(config, 'a', 1)\n", []),
    ("import importlib\nblock = getattr(importlib.import_module(m), 'Block')\nlayer = block(config).attn\n"
     "layer.x = 1\nblock.forward = f\n", [5]),
])
def test_the_scan_finds_fla_patches(source, lines):
    assert fla_patches(source) == lines


def test_only_keyred_fla_patching_sets_attributes_on_fla():
    package = REPO / "keyred"
    offenders = {str(file.relative_to(REPO)): lines for file in sorted(package.rglob("*.py"))
                 if file != package / "fla" / "patching.py" and (lines := fla_patches(file.read_text()))}
    assert offenders == {}, "patch fla through keyred.fla.patching (install / patched) only"
