"""The config schema: defaults, and clear errors naming the key path and what is allowed."""
import copy

import pytest
import yaml

from keyred.config import ConfigError, load_config, load_schema, settings_from_dict, validate_config
from keyred.training.lm import TrainSettings

from conftest import REPO


def default_config():
    return yaml.safe_load((REPO / "config.yaml").read_text())


def test_embedded_default_is_valid():
    config = load_config(REPO / "config.yaml")
    assert config["device"] == "cpu"
    assert set(config["models"]) == {"deltanet_tiny", "gated_deltanet_tiny"}


def test_defaults_are_filled_from_the_schema():
    config = validate_config({})
    assert config["train"]["steps"] == load_schema()["properties"]["train"]["properties"]["steps"]["default"]
    assert config["results_dir"] == "results"
    settings_from_dict(TrainSettings, config["train"], "train")  # every train key has a default


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


def test_every_error_is_reported_at_once():
    config = copy.deepcopy(default_config())
    config["train"]["steps"] = 0
    config["tokenizer"]["vocab_size"] = 1
    message = str(pytest.raises(ConfigError, validate_config, config).value)
    assert "train.steps" in message and "tokenizer.vocab_size" in message


def test_settings_reject_unknown_and_missing_keys():
    values = validate_config({})["train"]
    with pytest.raises(ConfigError, match="unknown key.*'extra'"):
        settings_from_dict(TrainSettings, {**values, "extra": 1}, "train")
    values.pop("lr")
    with pytest.raises(ConfigError, match="missing key.*lr"):
        settings_from_dict(TrainSettings, values, "train")
