"""Model variants (keyred.fla.variants): fla config overrides per model checked against fla's real
fields, the DeltaProduct presets and their parameter matching, the variant in keyred.json, the
training and evaluation tables, hub length-extrapolation sources, and the DeltaProduct paper config."""
import inspect
import json
import re
import shutil

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from conftest import REPO
from keyred.checkpoints import new_info, read_info, save_checkpoint
from keyred.config import ConfigError, load_config, load_schema, validate_config
from keyred.evaluation.extrapolation import (ExtrapolationSource, extrapolation_sources, field_text, source_texts,
                                             source_windows)
from keyred.fla.families import FAMILIES, REGISTRY, SIZES, VARIANT_COLUMNS, variant_of
from keyred.fla.models import (CONFIG_CLASSES, build_model, config_parameters, count_parameters, model_config,
                               preset_parameters)
from keyred.fla.variants import (PRESETS, allowed_fields, check_model_variants, config_fields, model_architecture)
from test_workflow import copy_workflow, planned_jobs, snakemake

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PAPER_CONFIG = REPO / "configs" / "deltaproduct_lm_340M.yaml"
# Overrides of every kind per family, each away from the tiny size's value.
OVERRIDES = {
    "delta_net": dict(num_heads=2, expand_k=0.5, expand_v=2, use_gate=True, allow_neg_eigval=True,
                      num_hidden_layers=3, hidden_size=48, tie_word_embeddings=True),
    "gated_deltanet": dict(num_heads=2, head_dim=8, expand_v=1, use_gate=False, allow_neg_eigval=True,
                           num_hidden_layers=3, hidden_size=48, tie_word_embeddings=True),
    "gated_deltaproduct": dict(num_householder=3, allow_neg_eigval=False, num_heads=2, head_dim=8, expand_v=1.5,
                               use_forget_gate=False, use_output_gate=False, tie_word_embeddings=True,
                               num_hidden_layers=3, hidden_size=48),
}


# ------------------------------------------------------------------------------ fla's fields

@pytest.mark.parametrize("family", FAMILIES)
def test_the_fields_read_from_fla_source_are_the_real_signature(family):
    """The ast reading of fla's source (no fla import) gives exactly inspect.signature of the class."""
    real = [name for name in inspect.signature(CONFIG_CLASSES[family].__init__).parameters
            if name not in ("self", "kwargs")]
    assert list(config_fields(family)) == real
    assert CONFIG_CLASSES[family].__module__ == REGISTRY[family].config_source
    assert "vocab_size" in real and "vocab_size" not in allowed_fields(family)


@pytest.mark.parametrize("family", FAMILIES)
def test_every_override_reaches_the_built_fla_config_and_model(family):
    model = build_model(family, "tiny", vocab_size=50, seed=0, overrides=OVERRIDES[family])
    for name, value in OVERRIDES[family].items():
        assert getattr(model.config, name) == value, name
    attn = model.model.layers[0].attn
    assert len(model.model.layers) == 3 and model.lm_head.weight is model.model.embeddings.weight
    if family == "gated_deltaproduct":
        assert (attn.num_householder, attn.allow_neg_eigval, attn.head_v_dim) == (3, False, 12)
        assert not hasattr(attn, "g_proj") and not hasattr(attn, "a_proj")
    tokens = torch.randint(0, 50, (1, 12))
    loss = model(input_ids=tokens, labels=tokens).loss
    loss.backward()
    assert torch.isfinite(loss)


def test_an_unknown_field_fails_naming_the_field_the_family_and_the_allowed_fields():
    with pytest.raises(ConfigError) as error:
        model_architecture("gated_deltaproduct", "tiny", overrides={"num_housholder": 2}, key="models.m")
    message = str(error.value)
    assert message.startswith("config key 'models.m.fla.num_housholder': gated_deltaproduct")
    assert "has no field 'num_housholder' (did you mean num_householder?)" in message
    assert "allowed fields: " + ", ".join(allowed_fields("gated_deltaproduct")) in message


def test_use_gate_is_refused_for_gated_deltaproduct_with_the_name_fla_reads_now():
    """fla 0.6 would take use_gate as an unknown keyword and leave the output gate on."""
    assert CONFIG_CLASSES["gated_deltaproduct"](use_gate=False).use_output_gate is True   # the trap itself
    with pytest.raises(ConfigError, match=r"'models.m.fla.use_gate': fla 0.6 renamed use_gate to use_output_gate "
                                          r"in gated_deltaproduct .* write use_output_gate"):
        model_architecture("gated_deltaproduct", "tiny", overrides={"use_gate": False}, key="models.m")
    for family in ("delta_net", "gated_deltanet"):          # they still call it use_gate
        assert model_architecture(family, "tiny", overrides={"use_gate": False})["use_gate"] is False


@pytest.mark.parametrize("overrides, problem", [
    ({"vocab_size": 10}, "'models.m.fla.vocab_size': not settable: keyred sets it from the tokenizer"),
    ({"num_heads": "4"}, "'models.m.fla.num_heads': must be int (fla's gated_deltanet config), got '4'"),
    ({"num_heads": True}, "must be int"),
    ({"head_dim": 16, "expand_v": 0.3}, "head_dim 16 x expand_v 0.3 = 4.8 is not a whole d_v"),
    ({"num_heads": 0}, "'models.m.fla.num_heads': must be positive, got 0"),
])
def test_bad_override_values_fail_naming_the_key(overrides, problem):
    with pytest.raises(ConfigError, match=re.escape(problem)):
        model_architecture("gated_deltanet", "tiny", overrides=overrides, key="models.m")


def test_deltanet_heads_must_split_the_key_width():
    with pytest.raises(ConfigError, match=r"'models.m.fla': hidden_size 64 x expand_k 1 = 64 does not split into "
                                          r"num_heads 5 whole heads"):
        model_architecture("delta_net", "tiny", overrides={"num_heads": 5}, key="models.m")


def test_a_config_check_names_presets_of_the_wrong_family_and_pretrained_models_with_overrides():
    schema_presets = load_schema()["properties"]["models"]["additionalProperties"]["properties"]["preset"]["enum"]
    assert schema_presets == [None, *PRESETS]
    config = validate_config({"models": {"m": {"family": "delta_net", "size": "tiny", "preset": "deltaproduct_nh2"}}})
    with pytest.raises(ConfigError, match="'models.m.family': preset deltaproduct_nh2 is a gated_deltaproduct model"):
        check_model_variants(config)
    config = validate_config({"models": {"m": {"family": "delta_net", "size": "tiny", "pretrained": "a/b",
                                               "fla": {"num_heads": 2}}}, "tokenizer": {"kind": "hub"}})
    with pytest.raises(ConfigError, match="'models.m': a pretrained model is loaded as its hub config says"):
        check_model_variants(config)
    with pytest.raises(ConfigError, match="models.m.preset"):
        validate_config({"models": {"m": {"family": "gated_deltaproduct", "size": "tiny", "preset": "dp2"}}})


def test_a_bad_field_fails_a_snakemake_dry_run_before_any_job(tmp_path):
    workdir = copy_workflow(tmp_path / "workflow")
    (workdir / "bad.yaml").write_text(yaml.safe_dump({"models": {"dp": {
        "family": "gated_deltaproduct", "size": "tiny", "preset": "deltaproduct_nh2", "fla": {"use_gate": False}}}}))
    result = snakemake(workdir, "-n", "--cores", "1", "models", "--configfile", "bad.yaml",
                       "--replace-workflow-config", check=False)
    output = result.stdout + result.stderr
    assert result.returncode != 0 and "Job stats" not in output
    assert "config key 'models.dp.fla.use_gate': fla 0.6 renamed use_gate to use_output_gate" in output


# ------------------------------------------------------------------------------------ presets

def test_presets_resolve_to_the_paper_shapes():
    assert [PRESETS[f"deltaproduct_nh{n}"]["340M"]["num_heads"] for n in (1, 2, 3)] == [12, 8, 6]
    keys = model_architecture("gated_deltaproduct", "340M", "deltaproduct_nh2")
    assert {key: keys[key] for key in ("hidden_size", "num_hidden_layers", "head_dim", "expand_v", "num_householder",
                                       "use_forget_gate", "use_output_gate", "use_short_conv", "tie_word_embeddings",
                                       "allow_neg_eigval")} == dict(
        hidden_size=1024, num_hidden_layers=24, head_dim=128, expand_v=1, num_householder=2, use_forget_gate=False,
        use_output_gate=False, use_short_conv=True, tie_word_embeddings=True, allow_neg_eigval=True)
    assert model_architecture("gated_deltaproduct", "340M", "deltaproduct_nh2",
                              {"allow_neg_eigval": False})["allow_neg_eigval"] is False     # fla overrides the preset
    tiny = [PRESETS[name]["tiny"] for name in PRESETS]
    assert [(p["hidden_size"], p["num_hidden_layers"], p["head_dim"], p["num_heads"]) for p in tiny] == [
        (64, 2, 16, 6), (64, 2, 16, 4), (64, 2, 16, 3)]


def test_the_preset_trio_is_parameter_matched_within_5_percent_at_every_size(capsys):
    from keyred.stages.presets import main

    assert main([]) == 0
    printed = capsys.readouterr().out
    rows = pd.DataFrame(preset_parameters())
    print(rows.to_string())
    for size in SIZES:
        counts = rows[rows["size"] == size]["non_embedding"]
        assert len(counts) == 3 and counts.max() / counts.min() < 1.05, size
        for count in counts:
            assert f"{count:,}" in printed
    assert rows[rows["size"] == "340M"]["n_h"].tolist() == [1, 2, 3]


@pytest.mark.parametrize("preset", PRESETS)
def test_the_meta_device_count_equals_a_real_tiny_model(preset):
    model = build_model("gated_deltaproduct", "tiny", vocab_size=300, preset=preset)
    counted = config_parameters(model.config)
    assert counted["parameters"] == sum(p.numel() for p in model.parameters())
    assert counted["non_embedding"] == count_parameters(model, include_embeddings=False) == \
        sum(p.numel() for p in model.parameters()) - 300 * 64                   # tied: one embedding matrix


# ---------------------------------------------------------------------------------- metadata

def test_variant_of_reads_objects_and_config_json_alike():
    config = model_config("gated_deltaproduct", "tiny", 50, "deltaproduct_nh3", {"use_forget_gate": True})
    variant = variant_of(config, "deltaproduct_nh3")
    assert list(variant) == list(VARIANT_COLUMNS)
    assert variant == dict(n_h=3, eigenvalues="[-1,1]", num_heads=3, d_k=16, d_v=16, forget_gate=True,
                           output_gate=False, preset="deltaproduct_nh3")
    assert variant_of(json.loads(config.to_json_string()), "deltaproduct_nh3") == variant
    assert variant_of(model_config("delta_net", "tiny")) == dict(
        n_h=1, eigenvalues="[0,1]", num_heads=4, d_k=16, d_v=16, forget_gate=False, output_gate=False, preset=None)
    assert variant_of(model_config("gated_deltanet", "tiny"))["forget_gate"] is True


def test_keyred_json_and_the_model_card_record_the_variant_and_children_keep_the_preset(tmp_path):
    model = build_model("gated_deltaproduct", "tiny", vocab_size=40, preset="deltaproduct_nh2",
                        overrides={"allow_neg_eigval": False})
    info = new_info("gated_deltaproduct", "tiny", stage="train", extra={"preset": "deltaproduct_nh2"})
    save_checkpoint(model, tmp_path / "trained", info)
    saved = read_info(tmp_path / "trained").variant
    assert saved == dict(n_h=2, eigenvalues="[0,1]", num_heads=4, d_k=16, d_v=16, forget_gate=False,
                         output_gate=False, preset="deltaproduct_nh2")
    card = (tmp_path / "trained" / "README.md").read_text()
    assert "| Householder steps n_h | 2 |" in card and "| eigenvalues | [0,1] |" in card
    assert "| preset | deltaproduct_nh2 |" in card and "| output gate | no |" in card
    child = new_info("gated_deltaproduct", "tiny", stage="prune", parent=str(tmp_path / "trained"))
    save_checkpoint(model, tmp_path / "pruned", child)
    assert read_info(tmp_path / "pruned").variant["preset"] == "deltaproduct_nh2"     # from the parent's keyred.json


# ------------------------------------------------------------------- the train and evaluate stages

@pytest.fixture(scope="module")
def trained(packed_wikipedia, tmp_path_factory):
    """A tiny deltaproduct_nh2 model with [0,1] eigenvalues trained for 2 steps by the train stage."""
    from keyred.stages.train import main

    out = tmp_path_factory.mktemp("trained")
    spec = {"model": {"family": "gated_deltaproduct", "size": "tiny", "preset": "deltaproduct_nh2",
                      "fla": {"allow_neg_eigval": False}},
            "train": {"steps": 2, "batch_size": 2, "seq_len": 32, "eval_every": 2, "eval_sequences": 2,
                      "warmup_steps": 1}}
    assert main(["--name", "dp2", "--spec", json.dumps(spec), "--device", "cpu", "--threads", "1",
                 "--packed", str(packed_wikipedia / "packed"), "--tokenizer", str(packed_wikipedia / "tokenizer"),
                 "--out", str(out / "checkpoint"), "--losses", str(out / "losses.csv")]) == 0
    return out


EXPECTED = dict(n_h=2, eigenvalues="[0,1]", num_heads=4, d_k=16, d_v=16, forget_gate=False, output_gate=False,
                preset="deltaproduct_nh2")


def test_the_train_stage_builds_the_variant_and_writes_its_columns(trained):
    losses = pd.read_csv(trained / "losses.csv")
    assert list(losses.columns[:3]) == ["model", "family", "size"]
    assert list(losses.columns[-len(VARIANT_COLUMNS):]) == list(VARIANT_COLUMNS)
    assert losses[list(VARIANT_COLUMNS)].iloc[-1].to_dict() == EXPECTED
    info = read_info(trained / "checkpoint")
    assert info.variant == EXPECTED and info.extra["fla"] == {"allow_neg_eigval": False}
    config = json.loads((trained / "checkpoint" / "config.json").read_text())
    assert (config["num_householder"], config["allow_neg_eigval"], config["num_heads"]) == (2, False, 4)


def test_a_bad_override_fails_the_train_stage_before_reading_data(tmp_path, capsys):
    from keyred.stages.train import main

    spec = {"model": {"family": "gated_deltaproduct", "size": "tiny", "fla": {"use_gate": False}}, "train": {}}
    assert main(["--name", "dp", "--spec", json.dumps(spec), "--packed", str(tmp_path / "missing"),
                 "--out", str(tmp_path / "c"), "--losses", str(tmp_path / "l.csv")]) == 2
    assert "'models.dp.fla.use_gate': fla 0.6 renamed use_gate to use_output_gate" in capsys.readouterr().err


def test_field_text_follows_dotted_paths_through_lists():
    row = {"entity_pages": {"title": ["A", "B"], "wiki_context": ["first page", "second page"]},
           "conversations": [{"from": "user", "value": "a problem"}, {"from": "assistant", "value": "its solution"}],
           "content": "print(1)"}
    assert field_text(row, "entity_pages.wiki_context") == "first page\n\nsecond page"
    assert field_text(row, "conversations.value") == "a problem\n\nits solution"
    assert field_text(row, "content") == "print(1)"
    source = extrapolation_sources({"s": {"dataset": "x/y", "text_field": "conversations.text"}})[0]
    assert (source.split, source.chunk_length, source.chunks, source.config) == ("train", 32768, 8, None)
    with pytest.raises(ConfigError, match=r"'evaluate.extrapolation_sources.s.text_field': row 1 of x/y has no "
                                          r"'text' on the path 'conversations.text'"):
        list(source_texts([row], source))


def test_source_windows_join_documents_with_eos_and_refuse_too_few_tokens(packed_wikipedia):
    from keyred.data.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(packed_wikipedia / "tokenizer")
    source = ExtrapolationSource("s", "x/y", None, "train", None, "text", chunk_length=20, chunks=3)
    texts = ["one two three four five six seven", "eight nine ten eleven twelve"] * 10
    windows = source_windows(iter(texts), tokenizer, source, batch=3)
    ids = [token for text in texts for token in [*tokenizer(text, add_special_tokens=False)["input_ids"],
                                                 tokenizer.eos_token_id]]
    assert windows.shape == (3, 21) and windows.ravel().tolist() == ids[:63]
    with pytest.raises(ConfigError, match=r"'evaluate.extrapolation_sources.s': x/y \(split train\) has \d+ tokens, "
                                          r"fewer than chunks x \(chunk_length \+ 1\) = 3 x 21 = 63"):
        source_windows(iter(texts[:2]), tokenizer, source)


def test_the_evaluate_stage_scores_hub_sources_and_writes_the_variant_columns(trained, packed_wikipedia, tmp_path,
                                                                           monkeypatch):
    import keyred.stages.evaluate as evaluate

    texts = [doc["text"] for doc in map(json.loads, (packed_wikipedia / "corpus" / "test.jsonl").open())]
    opened = []
    monkeypatch.setattr(evaluate, "open_source", lambda source: (opened.append(source.name) or
                                                                 [{"pages": {"text": [t]}} for t in texts], "sha"))
    spec = {"tasks": ["heldout_perplexity"], "max_documents": 2, "extrapolation_factor": 2,
            "extrapolation_sequences": 1,
            "extrapolation_sources": {"wiki": {"dataset": "x/y", "text_field": "pages.text", "chunk_length": 96,
                                               "chunks": 2}}}
    data = packed_wikipedia
    assert evaluate.main(["--checkpoint", str(trained / "checkpoint"), "--tokenizer", str(data / "tokenizer"),
                          "--heldout", str(data / "corpus" / "test.jsonl"), "--heldout-tokens",
                          str(data / "packed" / "test.npy"), "--context", "32", "--spec", json.dumps(spec),
                          "--name", "dp2", "--method", "none", "--ratio", "0", "--device", "cpu", "--threads", "1",
                          "--out", str(tmp_path / "eval.csv"), "--extrapolation", str(tmp_path / "curve.csv")]) == 0
    assert opened == ["wiki"]
    curve = pd.read_csv(tmp_path / "curve.csv")
    assert curve.groupby("source")["position"].max().to_dict() == {"heldout": 64, "wiki": 96}
    assert curve.groupby("source")["sequences"].first().to_dict() == {"heldout": 1, "wiki": 2}
    results = pd.read_csv(tmp_path / "eval.csv")
    assert list(results.columns[:3]) == ["model", "method", "ratio"]
    for table in (results, curve):
        assert list(table.columns[-len(VARIANT_COLUMNS):]) == list(VARIANT_COLUMNS)
        assert table[list(VARIANT_COLUMNS)].iloc[0].to_dict() == EXPECTED


# ------------------------------------------------------------------------------ the paper config

def test_the_deltaproduct_paper_config_validates_and_resolves():
    config = load_config(PAPER_CONFIG)
    check_model_variants(config)
    models = config["models"]
    assert len(models) == 9 and {m["preset"] for m in models.values()} == set(PRESETS)
    assert {name: m["fla"] for name, m in models.items() if m["fla"]} == {
        **{f"{n}_pos_340M": {"allow_neg_eigval": False} for n in ("dn", "dp2", "dp3")},
        **{f"g{n}_340M": {"use_forget_gate": True} for n in ("dn", "dp2", "dp3")}}
    train = config["train"]
    assert train["batch_size"] * train["seq_len"] * train["grad_accumulation"] == 524288
    assert 34.9e9 < train["steps"] * 524288 < 35.1e9
    assert (train["lr"], train["min_lr_ratio"], train["warmup_steps"], train["weight_decay"], train["grad_clip"]) == \
        (3e-4, 0.1, 512, 0.01, 1.0)
    evaluate = config["evaluate"]
    assert {"swde", "squad_completion", "fda"} <= set(evaluate["hub_tasks"])
    sources = extrapolation_sources(evaluate["extrapolation_sources"])
    assert [s.name for s in sources] == ["slimpajama_6b", "trivia_qa", "codeparrot", "openthoughts-114k-math"]
    assert {s.chunk_length for s in sources} == {32768}


def test_the_deltaproduct_paper_config_plans_its_jobs(tmp_path):
    workdir = copy_workflow(tmp_path / "workflow")
    shutil.copytree(REPO / "configs", workdir / "configs")
    result = snakemake(workdir, "-n", "-p", "--cores", "2", "models", "evaluation", "--configfile",
                       "configs/deltaproduct_lm_340M.yaml", "--replace-workflow-config")
    assert planned_jobs(result.stdout) == {"corpus": 1, "tokenizer": 1, "packing": 1, "train_lm": 9,
                                           "evaluate_lm": 9, "evaluation_tables": 1, "models": 1, "evaluation": 1,
                                           "total": 24}
    train = [line for line in result.stdout.splitlines() if "-m keyred.stages.train --name dp3_340M " in line]
    spec = json.loads(train[0].split("--spec '")[1].split("'")[0])
    assert spec["model"] == {"family": "gated_deltaproduct", "size": "340M", "preset": "deltaproduct_nh3", "fla": {},
                             "pretrained": None, "revision": None}
    evaluate = [line for line in result.stdout.splitlines() if "-m keyred.stages.evaluate " in line]
    spec = json.loads(evaluate[0].split("--spec '")[1].split("'")[0])
    assert spec["extrapolation_sources"]["codeparrot"]["dataset"] == "codeparrot/codeparrot-clean-valid"
    assert np.all([source["chunk_length"] == 32768 for source in spec["extrapolation_sources"].values()])
