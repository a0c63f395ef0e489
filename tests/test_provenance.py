"""Source digests that decide which rules re-run when keyred code changes."""
import shutil

import keyred.provenance as provenance
from conftest import REPO


def names(module):
    return {str(p.relative_to(provenance.PACKAGE_ROOT)) for p in provenance.stage_sources(module)}


def test_train_stage_sources_follow_imports_transitively():
    sources = names("keyred.training.lm")
    # direct imports, lazy imports inside functions, and what those import in turn
    assert {"training/lm.py", "config.py", "data/packing.py", "fla/models.py", "io.py", "fla/backend.py", "__init__.py"} <= sources
    # the CPU kernels, which the seam imports by the module names in keyred.fla.sites
    assert "kernels/delta_rule.py" in sources and "kernels/__init__.py" in sources
    assert not any(name.startswith("figures/") for name in sources)


def test_data_stage_sources_are_the_stage_and_its_library():
    assert names("keyred.stages.packing") == {
        "__init__.py", "stages/__init__.py", "stages/packing.py", "config.py", "console.py", "io.py",
        "data/__init__.py", "data/packing.py", "data/tokenizer.py", "data/corpus.py", "provenance.py"}


def test_figures_stage_does_not_depend_on_models():
    sources = names("keyred.figures.reduction")
    assert {"__init__.py", "figures/reduction.py", "figures/common.py", "io.py"} <= sources
    assert not {"fla/models.py", "training/lm.py", "data/packing.py"} & sources, sources


def test_modules_named_in_strings_are_sources(tmp_path, monkeypatch):
    copy = tmp_path / "keyred"
    shutil.copytree(REPO / "keyred", copy, ignore=shutil.ignore_patterns("__pycache__"))
    (copy / "named.py").write_text('"""Imports its ops at run time."""\nOPS = "keyred.kernels.layers"\n'
                                   'TEXT = "keyred.kernels.layers is named in a sentence, which is no module name"\n')
    monkeypatch.setattr(provenance, "PACKAGE_ROOT", copy)
    provenance.stage_sources.cache_clear()
    try:
        assert names("keyred.named") == {"__init__.py", "named.py", "kernels/__init__.py", "kernels/layers.py"}
    finally:
        provenance.stage_sources.cache_clear()


def test_digest_changes_only_with_the_stage_sources(tmp_path, monkeypatch):
    copy = tmp_path / "keyred"
    shutil.copytree(REPO / "keyred", copy, ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setattr(provenance, "PACKAGE_ROOT", copy)
    provenance.stage_sources.cache_clear()
    before = {m: provenance.code_digest(m) for m in ("keyred.training.lm", "keyred.figures.training")}
    (copy / "figures" / "training.py").write_text((copy / "figures" / "training.py").read_text() + "\n# changed\n")
    provenance.stage_sources.cache_clear()
    after = {m: provenance.code_digest(m) for m in ("keyred.training.lm", "keyred.figures.training")}
    assert after["keyred.training.lm"] == before["keyred.training.lm"]
    assert after["keyred.figures.training"] != before["keyred.figures.training"]
    provenance.stage_sources.cache_clear()
