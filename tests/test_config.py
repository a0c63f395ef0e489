"""The config schema: defaults, clear errors naming the key path and what is allowed, settings built
from it (the one source of every default and range), its enumerations equal to the code's
constants, and the schema shipped with the package."""
import ast
import copy
import dataclasses
import importlib
import os
import re
import shutil
import subprocess
import sys

import pytest
import yaml

from keyred.config import (ConfigError, load_config, load_schema, schema_at, section_settings, settings_from_dict,
                           validate_config)
from keyred.data.corpus import CorpusSettings

from conftest import REPO


def default_config():
    return yaml.safe_load((REPO / "config.yaml").read_text())


def test_embedded_default_is_valid():
    config = load_config(REPO / "config.yaml")
    assert config["device"] == "cpu"
    assert set(config["models"]) == {"deltanet_tiny", "gated_deltanet_tiny", "dp1_tiny", "dp2_tiny", "dp3_tiny"}
    assert set(config["recall"]["models"]) == {"deltanet", "gated_deltanet", "deltaproduct2"}


@pytest.mark.parametrize("name", sorted(path.name for path in (REPO / "configs").glob("*.yaml")))
def test_every_shipped_config_is_valid(name):
    load_config(REPO / "configs" / name)


def test_defaults_are_filled_from_the_schema():
    config = validate_config({})
    assert config["train"]["steps"] == load_schema()["properties"]["train"]["properties"]["steps"]["default"]
    assert config["results_dir"] == "results"
    settings_from_dict(CorpusSettings, config["corpus"], "corpus")  # every corpus key has a default


def test_every_schema_key_has_description_and_default():
    def walk(schema, where):
        for key, sub in schema.get("properties", {}).items():
            assert sub.get("description"), f"{where}{key} has no description"
            if where.count(".") == 0 or "default" in schema:  # leaves of sections with defaults
                assert "default" in sub, f"{where}{key} has no default"
            walk(sub, f"{where}{key}.")
    walk(load_schema(), "")


def test_unknown_key_is_named_with_allowed_keys():
    config = default_config()
    config["train"]["stepz"] = 3
    with pytest.raises(ConfigError) as error:
        validate_config(config)
    message = str(error.value)
    assert "train" in message and "'stepz'" in message and "steps" in message and "batch_size" in message


def test_unknown_top_level_key():
    with pytest.raises(ConfigError, match=r"unknown key\(s\) 'colour'.*allowed keys:.*models"):
        validate_config({"colour": "blue"})


def test_bad_enum_lists_allowed_values():
    config = default_config()
    config["models"]["deltanet_tiny"]["family"] = "mamba"
    with pytest.raises(ConfigError, match=r"models.deltanet_tiny.family': 'mamba' is not allowed; "
                                          r"allowed values: delta_net, gated_deltanet, gated_deltaproduct"):
        validate_config(config)


@pytest.mark.parametrize("key, value, expected", [
    ("steps", 0, "train.steps': 0 is less than the minimum of 1"),
    ("lr", -1.0, "train.lr': -1.0 is less than or equal to the minimum of 0"),
    ("batch_size", "big", "train.batch_size': 'big' is not of type 'integer'"),
    ("batch_size", 16.0, "train.batch_size': 16.0 is not of type 'integer'"),   # settings hold ints
    ("batch_size", True, "train.batch_size': True is not of type 'integer'"),
])
def test_out_of_range_values(key, value, expected):
    config = default_config()
    config["train"][key] = value
    with pytest.raises(ConfigError) as error:
        validate_config(config)
    assert expected in str(error.value)


def test_model_name_and_required_keys():
    with pytest.raises(ConfigError, match="'bad-name' must match the pattern"):
        validate_config({"models": {"bad-name": {"family": "delta_net", "size": "tiny"}}})
    with pytest.raises(ConfigError, match="'size' is a required property"):
        validate_config({"models": {"m": {"family": "delta_net"}}})


def test_malformed_group_name_shows_the_grammar():
    with pytest.raises(ConfigError, match=r"state_tracking.groups.0': 'S3xZ2' must match the pattern .*"
                                          r"joined by _x_, like A4_x_Z5"):
        validate_config({"state_tracking": {"groups": ["S3xZ2"]}})


def test_every_error_is_reported_at_once():
    config = copy.deepcopy(default_config())
    config["train"]["steps"] = 0
    config["tokenizer"]["vocab_size"] = 1
    message = str(pytest.raises(ConfigError, validate_config, config).value)
    assert "train.steps" in message and "tokenizer.vocab_size" in message


def test_settings_reject_unknown_and_missing_keys():
    values = validate_config({})["corpus"]
    with pytest.raises(ConfigError, match="unknown key.*'extra'"):
        settings_from_dict(CorpusSettings, {**values, "extra": 1}, "corpus")
    values.pop("seed")
    with pytest.raises(ConfigError, match="missing key.*seed"):
        settings_from_dict(CorpusSettings, values, "corpus")


# ------------------------------------------------------------------------------------ section_settings

@dataclasses.dataclass(frozen=True)
class _Prune:
    """The reduction.prune section plus two fields of one job (not config keys)."""
    round_to: int
    calibration_sequences: int
    calibration_length: int
    gradient_sequences: int
    batch_size: int
    rrqr_rows: int
    drrqr_sampling: str
    rrqr_f: float
    max_swaps: int | None
    seed: int
    method: str
    ratio: float


def test_section_settings_fill_the_schema_defaults_and_take_extra_fields():
    settings = section_settings(_Prune, "reduction.prune", {"seed": 3}, method="l1", ratio=0.5)
    defaults = {key: sub["default"] for key, sub in schema_at("reduction.prune")["properties"].items()}
    assert dataclasses.asdict(settings) == {**defaults, "seed": 3, "method": "l1", "ratio": 0.5}
    assert section_settings(CorpusSettings, "corpus", {"source": "files", "files": ["a.txt"]}).files == ("a.txt",)


@pytest.mark.parametrize("values, message", [
    ({"rrqr_f": 1}, "config key 'reduction.prune.rrqr_f': 1 is less than or equal to the minimum of 1"),
    ({"round_to": 8}, "config key 'reduction.prune.round_to': 8 is not allowed; allowed values: 1, 16"),
    ({"sead": 1}, "config key 'reduction.prune': unknown key(s) 'sead'; allowed keys: batch_size"),
    ([1, 2], "config key 'reduction.prune': must be an object of settings, got [1, 2]"),
])
def test_section_settings_name_the_key_in_one_line(values, message):
    with pytest.raises(ConfigError) as error:
        section_settings(_Prune, "reduction.prune", values, method="l1", ratio=0.5)
    assert str(error.value).startswith(message)


def test_section_settings_list_several_problems():
    with pytest.raises(ConfigError) as error:
        section_settings(_Prune, "reduction.prune", {"rrqr_f": 1, "seed": -1}, method="l1", ratio=0.5)
    assert str(error.value).splitlines()[0] == "invalid configuration:"
    assert "reduction.prune.rrqr_f" in str(error.value) and "reduction.prune.seed" in str(error.value)


def section_settings_calls():
    """(module, class expression, section expression) of every section_settings call in keyred/."""
    calls = []
    for file in sorted((REPO / "keyred").rglob("*.py")):
        module = ".".join(file.relative_to(REPO).with_suffix("").parts)
        for node in ast.walk(ast.parse(file.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "section_settings" \
                    and len(node.args) >= 2:
                calls.append((module, node.args[0], node.args[1]))
    return calls


def resolve(module, node):
    """The object a Name / Attribute / constant expression stands for in `module`, or None."""
    if isinstance(node, ast.Constant):
        return node.value
    if isinstance(node, ast.Name):
        return getattr(importlib.import_module(module), node.id, None)
    if isinstance(node, ast.Attribute):
        owner = resolve(module, node.value)
        return getattr(owner, node.attr, None) if owner is not None else None
    return None


def test_every_settings_dataclass_takes_its_defaults_from_the_schema():
    """Every dataclass built by section_settings (with a section named by a constant) is frozen and
    gives no default to a field the schema states: the schema is the one source of each default."""
    checked, problems = [], []
    for module, cls_node, section_node in section_settings_calls():
        cls, section = resolve(module, cls_node), resolve(module, section_node)
        if not (dataclasses.is_dataclass(cls) and isinstance(section, str)):
            continue                                  # a section built at run time (f-string, loop variable)
        checked.append((cls.__name__, section))
        keys = set(schema_at(section)["properties"])
        fields = {field.name: field for field in dataclasses.fields(cls)}
        if not cls.__dataclass_params__.frozen:
            problems.append(f"{module}.{cls.__name__} is not frozen")
        if keys - set(fields):
            problems.append(f"{module}.{cls.__name__} lacks the {section} keys {sorted(keys - set(fields))}")
        for name in keys & set(fields):
            field = fields[name]
            if field.default is not dataclasses.MISSING or field.default_factory is not dataclasses.MISSING:
                problems.append(f"{module}.{cls.__name__}.{name} has a default: the schema's {section}.{name} "
                                f"is the one")
    assert ("CorpusSettings", "corpus") in checked and ("TokenizerSettings", "tokenizer") in checked, checked
    assert not problems, "\n".join(problems)


def named_object(name):
    """The keyred module, or the object in a module, that a dotted name stands for (None: nothing)."""
    module, attributes = name, []
    while module:
        try:
            found = importlib.import_module(module)
            break
        except ModuleNotFoundError:
            module, _, tail = module.rpartition(".")
            attributes.insert(0, tail)
    else:
        return None
    for attribute in attributes:
        found = getattr(found, attribute, None)
    return found


def test_the_modules_the_schema_names_exist():
    """Descriptions name the keyred module (or class) that reads a section: each must be there."""
    text = (REPO / "keyred" / "schemas" / "config.schema.yaml").read_text()
    names = sorted(set(re.findall(r"keyred(?:\.[A-Za-z_]\w*)+", text)))
    assert len(names) > 5 and [name for name in names if named_object(name) is None] == []


# ------------------------------------------------------------------------------------------ enumerations

def code_constant(name, module):
    """The constant `name` of the keyred module `module`."""
    return getattr(importlib.import_module(module), name)


def schema_node(path):
    """The schema at a dotted path; '*' is a mapping's entries, '[]' an array's items."""
    node = load_schema()
    for part in path.split("."):
        key = {"*": "additionalProperties", "[]": "items"}.get(part)
        node = node[key] if key else node["properties"][part]
    return node


ENUMERATIONS = [   # (schema path, the code's constant as (name, module))
    ("device", ("DEVICES", "keyred.console")),
    ("models.*.family", ("FAMILIES", "keyred.fla.families")),
    ("models.*.size", ("SIZES", "keyred.fla.families")),
    ("models.*.size", ("SIZES", "keyred.resources")),
    ("corpus.source", ("SOURCES", "keyred.data.corpus")),
    ("tokenizer.kind", ("KINDS", "keyred.data.tokenizer")),
    ("evaluate.tasks.[]", ("LOCAL_TASKS", "keyred.evaluation.tasks")),
    ("evaluate.hub_tasks.[]", ("HUB_TASKS", "keyred.evaluation.tasks")),
    ("reduction.methods.[]", ("METHODS", "keyred.reduction.methods")),
    ("state_tracking.reduction.methods.[]", ("METHODS", "keyred.reduction.methods")),
    ("recall.reduction.methods.[]", ("METHODS", "keyred.reduction.methods")),
    ("recall.models.*.family", ("FAMILIES", "keyred.fla.families")),
    ("bench.mixer.families.[]", ("FAMILIES", "keyred.fla.families")),
    ("bench.mixer.passes.[]", ("PASSES", "keyred.bench.plan")),
    ("analysis.stage", ("REDUCED_STAGES", "keyred.checkpoints")),
]


@pytest.mark.parametrize("path, constant", ENUMERATIONS, ids=[f"{path}={c[0]}" for path, c in ENUMERATIONS])
def test_schema_enumerations_are_the_code_constants(path, constant):
    assert tuple(schema_node(path)["enum"]) == tuple(code_constant(*constant))


def test_schema_defaults_lie_in_the_enumerations():
    assert set(schema_node("reduction.methods")["default"]) <= set(schema_node("reduction.methods.[]")["enum"])
    assert set(schema_node("evaluate.tasks")["default"]) <= set(schema_node("evaluate.tasks.[]")["enum"])


def test_eigenvalue_ranges_are_the_paths_table():
    from keyred.specs import EIGENVALUE_RANGES

    assert tuple(schema_node("state_tracking.eigenvalue_ranges.[]")["enum"]) == tuple(EIGENVALUE_RANGES.values())


def test_group_names_follow_the_parser_grammar():
    from keyred.data.groups import MAX_ORDER, NAME_PATTERN

    groups = schema_node("state_tracking.groups")
    assert groups["items"]["pattern"] == NAME_PATTERN
    assert f"at most {MAX_ORDER} elements" in groups["description"]     # the order limit is the parser's


def test_byte_level_vocabulary_floor():
    from keyred.data.tokenizer import BYTE_ALPHABET, SPECIAL_TOKENS

    assert schema_node("tokenizer.vocab_size")["minimum"] == BYTE_ALPHABET + len(SPECIAL_TOKENS)


def test_benchmark_key_dims_stay_within_the_cuda_kernels():
    limit = code_constant("MAX_CUDA_KEY_DIM", "keyred.bench.runs")
    assert schema_node("bench.shape.key_dims.[]")["maximum"] == limit


# ------------------------------------------------------------------------------------- package data

def test_a_non_editable_install_ships_and_reads_the_schema(tmp_path):
    """pip install (not editable) of a copy of the project: the schema is in the installed package,
    validate_config reads it from there, and the `keyred` command runs."""
    source = tmp_path / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    shutil.copytree(REPO / "keyred", source / "keyred", ignore=shutil.ignore_patterns("__pycache__"))
    target = tmp_path / "installed"
    install = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation",
                              "--no-index", "--quiet", "--target", str(target), str(source)],
                             capture_output=True, text=True)
    assert install.returncode == 0, install.stdout + install.stderr
    assert (target / "keyred" / "schemas" / "config.schema.yaml").is_file()
    env = {**os.environ, "PYTHONPATH": str(target)}
    check = ("import keyred.config as c; assert c.SCHEMA_PATH.is_file(), c.SCHEMA_PATH; print(c.SCHEMA_PATH); "
             "print(c.validate_config({})['train']['steps']); c.validate_config({'train': {'steps': 0}})")
    result = subprocess.run([sys.executable, "-c", check], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert result.stdout.splitlines()[:2] == [str(target / "keyred" / "schemas" / "config.schema.yaml"), "400"], \
        result.stdout + result.stderr
    assert "config key 'train.steps': 0 is less than the minimum of 1" in result.stderr
    script = target / "bin" / "keyred"
    assert script.is_file()
    shown = subprocess.run([sys.executable, str(script), "--help"], cwd=tmp_path, env=env, capture_output=True,
                           text=True)
    assert shown.returncode == 0 and re.search(r"^  corpus +Collect", shown.stdout, re.MULTILINE), shown.stderr


# ------------------------------------------------------------------------------ checks between sections

@pytest.mark.parametrize("values, message", [
    ({"models": {"hub": {"family": "delta_net", "size": "1.3B", "pretrained": "fla-hub/delta_net-1.3B-100B"}}},
     "config key 'models.hub.pretrained': a pretrained hub model needs its own tokenizer: set tokenizer.kind to hub"),
    ({"reduction": {"models": ["mamba_tiny"]}},
     "config key 'reduction.models': 'mamba_tiny' is not a model of `models`; allowed: deltanet_tiny, "
     "gated_deltanet_tiny"),
    ({"analysis": {"ratio": 0.3}}, "config key 'analysis.ratio': 0.3 is not one of reduction.ratios (0.25, 0.5, 0.75)"),
])
def test_checks_between_sections(values, message):
    from keyred.specs import check_config

    check_config(validate_config({}))
    with pytest.raises(ConfigError) as error:
        check_config(validate_config(values))
    assert str(error.value).startswith(message)


def test_every_schema_key_has_a_description_and_no_stray_keys():
    """A YAML flow mapping cut at an unquoted comma leaves a truncated description and a stray key
    with a null value; every setting must have a description."""
    from keyred.config import load_schema

    allowed = {"type", "enum", "default", "description", "properties", "additionalProperties", "items", "minimum",
               "maximum", "exclusiveMinimum", "exclusiveMaximum", "minItems", "maxItems", "uniqueItems", "pattern",
               "minLength", "required", "oneOf", "anyOf", "$schema", "title", "minProperties", "propertyNames"}
    problems = []

    def walk(node, where):
        if not isinstance(node, dict):
            return
        problems.extend(f"{where}: unknown schema keyword {key!r}" for key in set(node) - allowed)
        for key, sub in node.get("properties", {}).items():
            if not isinstance(sub, dict) or not str(sub.get("description", "")).strip():
                problems.append(f"{where}.{key}: no description")
            walk(sub, f"{where}.{key}")
        for keyword in ("additionalProperties", "items"):
            if isinstance(node.get(keyword), dict):
                walk(node[keyword], f"{where}[{keyword}]")

    walk(load_schema(), "config")
    assert problems == []
