"""The key-reduction job of one (model, method): pruned and LoRA checkpoints per ratio, one
evaluation table, refusals before any work."""
import json

import pandas as pd
import pytest
import torch

from keyred.config import validate_config
from keyred.checkpoints import load_checkpoint, new_info, save_checkpoint
from keyred.fla.families import key_head_dim
from keyred.fla.models import build_model
from keyred.reduction.sweep import main

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def parent(packed_wikipedia, tmp_path_factory):
    folder = tmp_path_factory.mktemp("reduce") / "parent"
    save_checkpoint(build_model("gated_deltanet", "tiny", vocab_size=512, seed=0), folder,
                    new_info("gated_deltanet", "tiny", stage="train", seed=0))
    return folder


def spec(**finetune) -> str:
    defaults = validate_config({})
    return json.dumps({"prune": {**defaults["reduction"]["prune"], "calibration_sequences": 2,
                                 "calibration_length": 64, "gradient_sequences": 2},
                       "finetune": {**defaults["reduction"]["finetune"], "steps": 2, "batch_size": 2, "seq_len": 32,
                                    "eval_sequences": 2, **finetune},
                       "evaluate": {**defaults["evaluate"], "tasks": ["heldout_perplexity"], "max_documents": 1,
                                    "extrapolation_sequences": 1}})


def arguments(root, parent, out, method="drrqr", ratios=("0.5",), spec_json=None):
    return ["--name", "gdn", "--checkpoint", str(parent), "--packed", str(root / "packed"),
            "--corpus", str(root / "corpus"), "--tokenizer", str(root / "tokenizer"), "--method", method,
            "--ratios", *ratios, "--context", "32", "--spec", spec_json or spec(), "--out", str(out),
            "--device", "cpu", "--threads", "1"]


def test_one_job_prunes_recovers_and_evaluates_every_ratio(packed_wikipedia, parent, tmp_path):
    out = tmp_path / "gdn" / "drrqr"
    assert main(arguments(packed_wikipedia, parent, out, ratios=("0.25", "0.5"))) == 0

    results = pd.read_csv(out / "evaluation.csv")
    assert list(results.columns[:4]) == ["model", "method", "ratio", "stage"]
    assert set(zip(results["ratio"], results["stage"])) == {(0.25, "pruned"), (0.25, "lora"), (0.5, "pruned"),
                                                            (0.5, "lora")}
    assert results["value"].notna().all() and set(results["metric"]) >= {"bits_per_byte"}
    curves = pd.read_csv(out / "length_extrapolation.csv")
    assert curves.groupby(["ratio", "stage"])["position"].max().eq(4 * 32).all()

    pruned, pruned_info = load_checkpoint(out / "ratio0.5" / "pruned")
    recovered, recovered_info = load_checkpoint(out / "ratio0.5" / "lora")
    assert key_head_dim(pruned.config) == key_head_dim(recovered.config) == 8
    assert pruned_info.stage == "prune" and pruned_info.parent == str(parent)
    assert pruned_info.extra["method"] == "drrqr" and pruned_info.extra["ratio"] == 0.5
    assert recovered_info.stage == "finetune" and recovered_info.parent == str(out / "ratio0.5" / "pruned")
    assert recovered_info.extra["source"]["kept_indices"] == pruned_info.extra["kept_indices"]
    assert not torch.equal(pruned.model.layers[0].attn.v_proj.weight, recovered.model.layers[0].attn.v_proj.weight)


@pytest.mark.parametrize("method, ratios, spec_json, message", [
    ("obs", ("0.5",), None, "allowed methods: drrqr, rrqr"),
    ("l1", ("0.99",), None, "leaves d_k' = 0"),
    ("l1", ("0.5",), '{"prune": {}}', "exactly the sections prune, finetune, evaluate"),
])
def test_bad_input_fails_before_any_work(packed_wikipedia, parent, tmp_path, capsys, method, ratios, spec_json,
                                         message):
    code = main(arguments(packed_wikipedia, parent, tmp_path / "out", method, ratios, spec_json))
    error = capsys.readouterr().err
    assert code == 2 and message in error, error
    assert not (tmp_path / "out").exists()
