"""The key-reduction job of one (model, method) (keyred.reduction.sweep, keyred.stages.reduce):
pruned and LoRA checkpoints per ratio in the layout keyred.checkpoints reads back, one evaluation
table, refusals before any work (in the job and in the workflow's dry run)."""
import json

import numpy as np
import pandas as pd
import pytest
import torch

from keyred.checkpoints import LORA, PRUNED, REDUCED_STAGES, CheckpointError, new_info, ratio_folder, reduced_checkpoint, reduced_checkpoints, reduction_table_path, save_checkpoint
from keyred.fla.models import load_checkpoint
from keyred.config import ConfigError, validate_config
from keyred.fla.families import key_head_dim
from keyred.fla.models import build_model
from keyred.reduction.sweep import read_sections
from keyred.stages.reduce import main

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def parent(packed_wikipedia, tmp_path_factory):
    folder = tmp_path_factory.mktemp("reduce") / "parent"
    save_checkpoint(build_model("gated_deltanet", "tiny", vocab_size=512, seed=0), folder,
                    new_info("gated_deltanet", "tiny", stage="train", seed=0))
    return folder


def spec(documents: int = 1, **finetune) -> str:
    defaults = validate_config({})
    return json.dumps({"prune": {**defaults["reduction"]["prune"], "calibration_sequences": 2,
                                 "calibration_length": 64, "gradient_sequences": 2},
                       "finetune": {**defaults["reduction"]["finetune"], "steps": 2, "batch_size": 2, "seq_len": 32,
                                    "eval_sequences": 2, **finetune},
                       "evaluate": {**defaults["evaluate"], "tasks": ["heldout_perplexity"],
                                    "max_documents": documents,
                                    "extrapolation_sequences": 1}})


def arguments(root, parent, out, method="drrqr", ratios=("0.5",), spec_json=None):
    return ["--name", "gdn", "--checkpoint", str(parent), "--packed", str(root / "packed"),
            "--corpus", str(root / "corpus"), "--tokenizer", str(root / "tokenizer"), "--method", method,
            "--ratios", *ratios, "--context", "32", "--spec", spec_json or spec(), "--out", str(out),
            "--device", "cpu", "--threads", "1"]


def test_one_job_prunes_recovers_and_evaluates_every_ratio(packed_wikipedia, parent, tmp_path):
    out = tmp_path / "gdn" / "drrqr"
    assert main(arguments(packed_wikipedia, parent, out, ratios=("0.25", "0.5"), spec_json=spec(documents=3))) == 0

    results = pd.read_csv(reduction_table_path(out, "evaluation"))
    assert list(results.columns) == ["model", "method", "ratio", "stage", "task", "metric", "value", "stderr", "n",
                                     "delta", "delta_stderr"]
    bits = results[results.metric == "bits_per_byte"]
    assert len(bits) == 4 and (bits.n == 3).all()
    assert np.isfinite(bits[["stderr", "delta", "delta_stderr"]]).all().all()
    assert (bits.delta_stderr < bits.stderr).all()     # paired with the parent on the same documents
    assert set(zip(results["ratio"], results["stage"])) == {(0.25, PRUNED), (0.25, LORA), (0.5, PRUNED),
                                                            (0.5, LORA)}
    assert results["value"].notna().all() and set(results["metric"]) >= {"bits_per_byte"}
    curves = pd.read_csv(reduction_table_path(out, "length_extrapolation"))
    assert curves.groupby(["ratio", "stage"])["position"].max().eq(4 * 32).all()
    assert set(pd.read_csv(reduction_table_path(out, "finetune_loss"))["ratio"]) == {0.25, 0.5}

    assert (out / "ratio0.5" / "pruned").is_dir() and (out / "ratio0.25" / "lora").is_dir()  # the layout, spelled out
    pruned, pruned_info = load_checkpoint(reduced_checkpoint(out, 0.5, PRUNED))
    recovered, recovered_info = load_checkpoint(reduced_checkpoint(out, 0.5, LORA))
    assert key_head_dim(pruned.config) == key_head_dim(recovered.config) == 8
    assert pruned_info.stage == "prune" and pruned_info.parent == str(parent)
    assert pruned_info.extra["method"] == "drrqr" and pruned_info.extra["ratio"] == 0.5
    assert recovered_info.stage == "finetune" and recovered_info.parent == str(out / "ratio0.5" / "pruned")
    assert recovered_info.extra["source"]["kept_indices"] == pruned_info.extra["kept_indices"]
    assert not torch.equal(pruned.model.layers[0].attn.v_proj.weight, recovered.model.layers[0].attn.v_proj.weight)


def test_the_layout_the_sweep_writes_is_the_one_read_back(packed_wikipedia, parent, tmp_path):
    """Ratios as the command line gives them (the workflow writes str(ratio)), including ones whose
    decimal spelling is not exact in binary (0.1) or that a command line may pad (0.50)."""
    out = tmp_path / "gdn" / "l1"
    spec_json = spec(steps=1)
    assert main(arguments(packed_wikipedia, parent, out, "l1", ("0.1", "0.25", "0.50", "0.75"), spec_json)) == 0
    ratios = [0.1, 0.25, 0.5, 0.75]
    assert sorted(path.name for path in out.glob("ratio*")) == [ratio_folder(r) for r in ratios] == \
        ["ratio0.1", "ratio0.25", "ratio0.5", "ratio0.75"]
    for stage in REDUCED_STAGES:
        found = reduced_checkpoints(out, stage)
        assert found == {r: reduced_checkpoint(out, r, stage) for r in ratios}
        for ratio, folder in found.items():
            info = load_checkpoint(folder)[1]
            assert info.stage == {PRUNED: "prune", LORA: "finetune"}[stage]
            assert (info.extra if stage == PRUNED else info.extra["source"])["ratio"] == ratio
    evaluated = pd.read_csv(reduction_table_path(out, "evaluation"))
    assert set(evaluated["ratio"]) == set(reduced_checkpoints(out, PRUNED))


def test_reduced_checkpoints_reads_only_the_layout(tmp_path):
    for name in ("ratio0.25/pruned", "ratio0.1/pruned", "ratio0.1/lora", "ratio0.50/pruned", "ratiox/pruned",
                 "other/pruned"):
        (tmp_path / name).mkdir(parents=True)
    assert reduced_checkpoints(tmp_path, PRUNED) == {0.1: tmp_path / "ratio0.1" / "pruned",
                                                     0.25: tmp_path / "ratio0.25" / "pruned"}
    assert reduced_checkpoints(tmp_path, LORA) == {0.1: tmp_path / "ratio0.1" / "lora"}
    with pytest.raises(CheckpointError, match="holds no ratio"):
        reduced_checkpoints(tmp_path / "other", PRUNED)
    with pytest.raises(CheckpointError, match="unknown reduction stage 'finetune'; allowed: pruned, lora"):
        reduced_checkpoint(tmp_path, 0.5, "finetune")
    assert ratio_folder(0) == "ratio0" and ratio_folder(0.3) == "ratio0.3" and ratio_folder(1e-05) == "ratio1e-05"


def test_ratios_that_share_a_folder_are_refused():
    sections = json.loads(spec())
    with pytest.raises(ConfigError, match=r"ratios 0.1234567 and 0.1234568 would share the folder ratio0.123457"):
        read_sections(sections, "l1", [0.1234567, 0.1234568])
    with pytest.raises(ConfigError, match=r"ratios 0.5 and 0.5 would share the folder ratio0.5"):
        read_sections(sections, "l1", [0.5, 0.5])


def test_spec_sections_are_built_from_the_schema():
    defaults = validate_config({})
    prunes, finetuning, evaluation = read_sections(
        {"prune": {}, "finetune": {}, "evaluate": {}}, "drrqr", [0.25, 0.5])
    assert [(p.method, p.ratio) for p in prunes] == [("drrqr", 0.25), ("drrqr", 0.5)]
    assert prunes[0].rrqr_f == defaults["reduction"]["prune"]["rrqr_f"]
    assert evaluation.tasks == tuple(defaults["evaluate"]["tasks"])
    with pytest.raises(ConfigError, match=r"'reduction\.prune': unknown key\(s\) 'method'"):
        read_sections({"prune": {"method": "l1"}, "finetune": {}, "evaluate": {}}, "drrqr", [0.5])
    with pytest.raises(ConfigError, match=r"'reduction\.prune\.rrqr_f': 1 is less than or equal to the minimum of 1"):
        read_sections({"prune": {"rrqr_f": 1}, "finetune": {}, "evaluate": {}}, "drrqr", [0.5])


def test_the_dry_run_refuses_rrqr_f_of_one(tmp_path):
    """The workflow checks the config before any job runs: a reduce job would fail inside at f = 1."""
    from test_workflow import copy_workflow, snakemake, write_yaml

    workdir = copy_workflow(tmp_path / "workflow")
    name = write_yaml(workdir / "bad_rrqr.yaml", {"reduction": {"prune": {"rrqr_f": 1}}})
    result = snakemake(workdir, "-n", "--cores", "1", "--configfile", "config.yaml", name, check=False)
    output = result.stdout + result.stderr
    assert result.returncode != 0 and "config key 'reduction.prune.rrqr_f': 1 is less than or equal to the minimum" \
        in output, output[-3000:]
    assert "Job stats:" not in output           # refused before planning any job


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


def test_the_reduction_table_and_figure_carry_standard_errors_and_the_resolution(tmp_path):
    """Baselines get no paired difference; the resolution is 2 x the median paired stderr per metric."""
    from keyred.checkpoints import UNPRUNED
    from keyred.figures.reduction import REDUCTION_METRICS, TABLE_COLUMNS, plot_reduction, reduction_table, resolution

    metrics = [(task, metric) for task, metric, _ in REDUCTION_METRICS]
    baseline = pd.DataFrame([dict(model="gdn", method="none", ratio=0.0, task=task, metric=metric, value=2.0,
                                  stderr=0.1, n=5, d_k=16) for task, metric in metrics])
    baseline.to_csv(tmp_path / "baseline.csv", index=False)
    folder = tmp_path / "gdn" / "l1"
    folder.mkdir(parents=True)
    reduced = pd.DataFrame([dict(model="gdn", method="l1", ratio=ratio, stage=stage, task=task, metric=metric,
                                 value=2.0 + ratio, stderr=0.1, n=5, delta=ratio, delta_stderr=0.001 * (1 + index))
                            for index, (ratio, stage) in enumerate([(0.25, PRUNED), (0.5, PRUNED), (0.5, LORA)])
                            for task, metric in metrics])
    reduced.to_csv(reduction_table_path(folder, "evaluation"), index=False)
    table = reduction_table([tmp_path / "baseline.csv"], [folder])
    assert list(table.columns) == TABLE_COLUMNS and len(table) == 4 * len(metrics)
    unpruned = table[table.stage == UNPRUNED]
    assert unpruned.delta.isna().all() and unpruned.delta_stderr.isna().all() and (unpruned.stderr == 0.1).all()
    resolved = resolution(table)
    assert len(resolved) == len(metrics) and np.allclose(resolved.resolution, 2 * 0.002)
    plot_reduction(table, tmp_path / "reduction.png")
    assert (tmp_path / "reduction.png").stat().st_size > 10_000
