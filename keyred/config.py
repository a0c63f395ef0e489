"""The workflow configuration: schema validation with defaults, and typed settings.

`keyred/schemas/config.schema.yaml` (package data) is the single source of truth: every key, its
default, its range and its description. `validate_config` fills defaults and raises `ConfigError`
naming the key path and what is allowed; `section_settings` validates one section (a stage's
--spec) the same way and builds its frozen settings dataclass, whose fields carry no defaults of
their own. Checks the schema cannot state (between keys, or against a model) stay with the
dataclass. Importing this module is cheap (no torch).
"""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path
from typing import Any, TypeVar

import jsonschema
import yaml

SCHEMA_PATH = Path(__file__).resolve().parent / "schemas" / "config.schema.yaml"
# JSON Schema counts 4096.0 as an integer; keyred's settings are Python ints, so only ints (not bools) are.
Validator = jsonschema.validators.extend(
    jsonschema.Draft202012Validator,
    type_checker=jsonschema.Draft202012Validator.TYPE_CHECKER.redefine(
        "integer", lambda checker, value: isinstance(value, int) and not isinstance(value, bool)))

T = TypeVar("T")


class ConfigError(ValueError):
    """A configuration value is missing, unknown or out of range."""


def load_schema(path: Path = SCHEMA_PATH) -> dict:
    with open(path) as f:
        return yaml.safe_load(f)


def _key_path(parts) -> str:
    return ".".join(str(p) for p in parts) or "<top level>"


def _describe(error: jsonschema.ValidationError) -> str:
    """One readable line: the key path, what is wrong, what is allowed."""
    schema = error.schema
    where = _key_path(error.absolute_path)
    if error.validator == "additionalProperties" and isinstance(error.instance, dict):
        allowed = sorted(schema.get("properties", {}))
        unknown = sorted(set(error.instance) - set(allowed))
        return (f"config key '{where}': unknown key(s) {', '.join(map(repr, unknown))}; "
                f"allowed keys: {', '.join(allowed) or 'none'}")
    if error.validator == "enum":
        return (f"config key '{where}': {error.instance!r} is not allowed; "
                f"allowed values: {', '.join(map(str, schema['enum']))}")
    if error.validator == "required":
        return f"config key '{where}': {error.message}"
    description = schema.get("description", "").strip()
    hint = f" ({description})" if description else ""
    if error.validator == "pattern":
        return f"config key '{where}': {error.instance!r} must match the pattern {schema['pattern']}{hint}"
    return f"config key '{where}': {error.message}{hint}"


def _fill_defaults(instance: Any, schema: dict) -> Any:
    """Recursively insert schema defaults for missing object keys (instance is modified)."""
    if not isinstance(instance, dict) or schema.get("type") != "object":
        return instance
    for key, sub in schema.get("properties", {}).items():
        if key not in instance and "default" in sub:
            instance[key] = copy.deepcopy(sub["default"])
        if key in instance:
            _fill_defaults(instance[key], sub)
    extra = schema.get("additionalProperties")
    if isinstance(extra, dict):
        for key in set(instance) - set(schema.get("properties", {})):
            _fill_defaults(instance[key], extra)
    return instance


def validate_config(config: dict, schema: dict | None = None) -> dict:
    """Return a validated copy of `config` with every default filled in.

    Raises ConfigError listing every problem, one line each, with the key path.
    """
    schema = schema or load_schema()
    if not isinstance(config, dict):
        raise ConfigError(f"the configuration must be a mapping of keys to values, got {type(config).__name__}")
    filled = _fill_defaults(copy.deepcopy(config), schema)
    validator = Validator(schema)
    errors = sorted(validator.iter_errors(filled), key=lambda e: (list(map(str, e.absolute_path)), e.validator))
    if errors:
        lines = "\n  ".join(dict.fromkeys(_describe(e) for e in errors))
        raise ConfigError(f"invalid configuration:\n  {lines}")
    return filled


def load_config(path: str | Path) -> dict:
    """Read a YAML config file and validate it."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    with open(path) as f:
        raw = yaml.safe_load(f) or {}
    return validate_config(raw)


def require(condition: bool, key: str, problem: str) -> None:
    """ConfigError "config key '<key>': <problem>" unless `condition` holds."""
    if not condition:
        raise ConfigError(f"config key '{key}': {problem}")


def is_int(value) -> bool:
    """A whole number, not a bool (JSON true is not 1)."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value) -> bool:
    """An int or a float, not a bool."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def schema_at(section: str, schema: dict | None = None) -> dict:
    """The schema of one dotted config section ('train', 'reduction.prune'; 'models.*' is an entry
    of a mapping section, the schema's additionalProperties)."""
    node = schema or load_schema()
    for part in section.split("."):
        node = node["additionalProperties"] if part == "*" else node["properties"][part]
    return node


def section_settings(cls: type[T], section: str, values: dict | None, **extra) -> T:
    """The frozen dataclass `cls` of one config section, built from the schema (the one source of
    every default and range): `values` are validated against the section's schema with its
    defaults filled in (ConfigError naming 'section.key' and what is allowed), lists become tuples.
    `extra` are fields of `cls` that are not config keys of the section (e.g. one job's method).
    One problem is one line "config key 'section.key': ..."; several are listed under a header."""
    sub = schema_at(section)
    require(values is None or isinstance(values, dict), section, f"must be an object of settings, got {values!r}")
    filled = _fill_defaults(copy.deepcopy(values or {}), sub)
    errors = sorted(Validator(sub).iter_errors(filled),
                    key=lambda e: (list(map(str, e.absolute_path)), e.validator))
    if errors:
        prefix = section.split(".")
        lines = []
        for error in errors:
            error.path.extendleft(reversed(prefix))
            lines.append(_describe(error))
        lines = list(dict.fromkeys(lines))
        raise ConfigError(lines[0] if len(lines) == 1 else "invalid configuration:\n  " + "\n  ".join(lines))
    return settings_from_dict(cls, {**filled, **extra}, section)


def settings_from_dict(cls: type[T], values: dict, section: str) -> T:
    """Build the frozen dataclass `cls` from a mapping, rejecting unknown and missing keys; JSON/YAML
    lists become tuples (the settings dataclasses are frozen and hold tuples)."""
    require(isinstance(values, dict), section, f"must be an object of settings, got {values!r}")
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - fields)
    if unknown:
        raise ConfigError(f"config key '{section}': unknown key(s) {', '.join(map(repr, unknown))}; "
                          f"allowed keys: {', '.join(sorted(fields))}")
    required = {f.name for f in dataclasses.fields(cls)
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING}
    missing = sorted(required - set(values))
    if missing:
        raise ConfigError(f"config key '{section}': missing key(s) {', '.join(missing)}")
    return cls(**{key: tuple(value) if isinstance(value, list) else value for key, value in values.items()})
