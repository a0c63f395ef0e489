"""The Snakemake DAG: dry runs (the plans of every shipped config equal those recorded before the
package redesign), `keyred <stage> --config` giving the workflow's commands, config errors before
any job, the whole default run, reruns, the HTML report in headless Chromium."""
import argparse
import base64
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from conftest import REPO
from dry_run_plan import dry_run_plan

WORKFLOW_FILES = ("Snakefile", "config.yaml", "workflow", "keyred", "profiles")


def copy_workflow(destination):
    destination.mkdir(parents=True, exist_ok=True)
    for name in WORKFLOW_FILES:
        source = REPO / name
        if source.is_dir():
            shutil.copytree(source, destination / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(source, destination / name)
    return destination


def snakemake(workdir, *args, check=True):
    """Run snakemake in `workdir` with the keyred copied there first on the import path."""
    env = {**os.environ, "PYTHONPATH": str(workdir)}
    result = subprocess.run([sys.executable, "-m", "snakemake", *args], cwd=workdir, env=env,
                            capture_output=True, text=True)
    if check and result.returncode != 0:
        raise AssertionError(f"snakemake {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}")
    return result


def planned_jobs(output: str) -> dict[str, int]:
    """Job counts from the 'Job stats' table of a dry run ({} when nothing is to be done)."""
    counts = {}
    if "Job stats:" not in output:
        return counts
    table = output.split("Job stats:")[1]
    for line in table.splitlines()[3:]:
        match = re.fullmatch(r"(\w+)\s+(\d+)", line.strip())
        if not match:
            break
        counts[match[1]] = int(match[2])
    return counts


def write_yaml(path, data):
    path.write_text(yaml.safe_dump(data))
    return path.name


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return copy_workflow(tmp_path_factory.mktemp("workflow"))


def test_dry_run_lists_exactly_the_expected_jobs(workdir):
    result = snakemake(workdir, "-n", "--cores", "2")
    assert planned_jobs(result.stdout) == {"corpus": 1, "tokenizer": 1, "packing": 1, "train_lm": 5,
                                           "training_loss_table": 1, "evaluate_lm": 5, "evaluation_tables": 1,
                                           "reduce": 6, "reduction_tables": 1, "paper_tables": 1,
                                           "state_tracking_data": 2, "state_tracking_run": 8,
                                           "state_tracking_tables": 1, "state_tracking_figures": 1,
                                           "state_tracking_pruning": 8, "state_tracking_pruning_table": 1,
                                           "state_tracking_pruning_figure": 1, "bench_mixer": 1, "bench_decode": 1,
                                           "bench_models": 3, "bench_tables": 1, "state_rank_model": 11,
                                           "state_rank_tables": 1, "state_tracking_rank": 1,
                                           "state_tracking_rank_figure": 1, "recall_data": 1, "recall_train": 12,
                                           "recall_reduce": 9, "recall_tables": 1, "all": 1, "total": 89}


def figure_and_table_targets(workdir) -> list[str]:
    """The one-per-figure-and-table targets (fig_*, table_*) of the default config."""
    rules = snakemake(workdir, "--list-rules").stdout.split()
    return [rule for rule in rules if rule.startswith(("fig_", "table_"))]


def test_every_figure_and_table_has_a_target_a_caption_and_a_readme_line(workdir):
    targets = figure_and_table_targets(workdir)
    assert len(targets) == 36
    readme = (REPO / "README.md").read_text()
    captions = {path.stem for path in (REPO / "workflow" / "report").glob("*.rst")} - {"workflow"}
    assert captions == set(targets)
    for target in targets:
        assert f"| `{target}` |" in readme, f"README lists no line for {target}"
    jobs = planned_jobs(snakemake(workdir, "-n", "--cores", "2", "fig_key_dim_scaling").stdout)
    assert jobs["fig_key_dim_scaling"] == 1 and jobs["bench_tables"] == 1 and jobs["bench_mixer"] == 1
    assert "state_rank_model" not in jobs and "state_tracking_run" not in jobs


def test_analysis_ratio_must_be_a_reduced_ratio(workdir):
    name = write_yaml(workdir / "bad_ratio.yaml", {"analysis": {"ratio": 0.3}})
    result = snakemake(workdir, "-n", "--cores", "2", "--configfile", "config.yaml", name, check=False)
    assert result.returncode != 0 and "'analysis.ratio': 0.3 is not one of reduction.ratios" in result.stdout + result.stderr


def test_named_target_plans_only_its_jobs(workdir):
    result = snakemake(workdir, "-n", "--cores", "2", "models")
    assert planned_jobs(result.stdout) == {"corpus": 1, "tokenizer": 1, "packing": 1, "train_lm": 5, "models": 1,
                                           "total": 9}


def test_paper_state_tracking_config_plans_the_full_sweep(workdir):
    shutil.copytree(REPO / "configs", workdir / "configs", dirs_exist_ok=True)
    result = snakemake(workdir, "-n", "--cores", "2", "state_tracking",
                       "--configfile", "configs/state_tracking_paper.yaml", "--replace-workflow-config")
    # 4 groups x n_h 1..4 x 2 eigenvalue ranges x 3 seeds; the word problems of each group and seed
    assert planned_jobs(result.stdout) == {"state_tracking_data": 12, "state_tracking_run": 96,
                                           "state_tracking_tables": 1, "state_tracking_figures": 1,
                                           "state_tracking": 1, "total": 111}


@pytest.mark.parametrize("config, models", [("lm_paper_340M.yaml", 2), ("lm_hub_1.3B.yaml", 1)])
def test_paper_language_model_configs_plan_their_jobs(workdir, config, models):
    shutil.copytree(REPO / "configs", workdir / "configs", dirs_exist_ok=True)
    result = snakemake(workdir, "-n", "--cores", "2", "models", "evaluation", "--configfile", f"configs/{config}",
                       "--replace-workflow-config")
    assert planned_jobs(result.stdout) == {"corpus": 1, "tokenizer": 1, "packing": 1, "train_lm": models,
                                           "evaluate_lm": models, "evaluation_tables": 1, "models": 1,
                                           "evaluation": 1, "total": 6 + 2 * models}


def test_the_paper_config_benchmarks_the_1_3b_shape_from_cuda_graphs(workdir):
    shutil.copytree(REPO / "configs", workdir / "configs", dirs_exist_ok=True)
    result = snakemake(workdir, "-n", "-p", "--cores", "2", "bench_mixer", "bench_decode",
                       "--configfile", "configs/lm_paper_340M.yaml", "--replace-workflow-config")
    commands = {words[words.index("keyred.stages.bench") + 1]: words for line in result.stdout.splitlines()
                if "-m keyred.stages.bench " in line for words in [shlex.split(line.strip())]}
    assert set(commands) == {"mixer", "decode"}
    for words in commands.values():
        spec = json.loads(words[words.index("--spec") + 1])
        assert spec["cuda_graph"] is True and spec["hidden"] == 2048 and spec["key_dims"] == [128, 64, 32]
    assert json.loads(commands["mixer"][commands["mixer"].index("--spec") + 1])["passes"] == ["forward"]


def test_reduction_target_plans_one_job_per_model_and_method(workdir):
    name = write_yaml(workdir / "reduce_some.yaml", {"reduction": {"models": ["deltanet_tiny"],
                                                                   "methods": ["l1", "drrqr"]}})
    result = snakemake(workdir, "-n", "--cores", "2", "reduction", "--configfile", "config.yaml", name)
    jobs = planned_jobs(result.stdout)
    assert jobs["reduce"] == 2 and jobs["reduction_tables"] == 1 and jobs["train_lm"] == 1
    assert "method=l1" in result.stdout and "method=drrqr" in result.stdout and "method=pca" not in result.stdout


def test_unknown_reduction_model_fails_before_any_job(workdir):
    name = write_yaml(workdir / "reduce_bad.yaml", {"reduction": {"models": ["mamba_tiny"]}})
    result = snakemake(workdir, "-n", "--cores", "2", "--configfile", "config.yaml", name, check=False)
    assert result.returncode != 0 and "'mamba_tiny' is not a model of `models`" in result.stdout + result.stderr


def test_pretrained_model_needs_the_hub_tokenizer(workdir):
    name = write_yaml(workdir / "pretrained.yaml", {"models": {"hub": {"family": "delta_net", "size": "1.3B",
                                                                       "pretrained": "fla-hub/delta_net-1.3B-100B"}}})
    result = snakemake(workdir, "-n", "--cores", "2", "--configfile", "config.yaml", name, check=False)
    assert result.returncode != 0 and "set tokenizer.kind to hub" in result.stdout + result.stderr


def test_unknown_group_fails_before_any_job(workdir):
    name = write_yaml(workdir / "bad_group.yaml", {"state_tracking": {"groups": ["S9"]}})
    result = snakemake(workdir, "-n", "--cores", "2", "--configfile", "config.yaml", name, check=False)
    assert result.returncode != 0
    assert "state_tracking.groups" in result.stdout + result.stderr and "joined by _x_" in result.stdout + result.stderr


def test_bad_config_key_fails_before_any_job(workdir):
    name = write_yaml(workdir / "bad.yaml", {"train": {"stepz": 10}})
    result = snakemake(workdir, "-n", "--cores", "2", "--configfile", "config.yaml", name, check=False)
    assert result.returncode != 0
    output = result.stdout + result.stderr
    assert "config key 'train': unknown key(s) 'stepz'; allowed keys: batch_size" in output
    assert not (workdir / "results").exists()


def test_out_of_range_value_fails_before_any_job(workdir):
    name = write_yaml(workdir / "bad_range.yaml", {"models": {"m": {"family": "delta_net", "size": "huge"}}})
    result = snakemake(workdir, "-n", "--cores", "2", "--configfile", "config.yaml", name, check=False)
    assert result.returncode != 0
    assert "models.m.size': 'huge' is not allowed; allowed values: tiny, small, 340M, 1.3B" in result.stdout + result.stderr


def test_every_rule_digests_the_code_it_runs():
    """A rule that runs `python -m keyred.stages.<stage>` re-runs when that module (or what it
    imports) changes: its `code` param is the digest of the same module."""
    checked = 0
    for file in sorted((REPO / "workflow" / "rules").glob("*.smk")):
        for block in re.split(r"^(?=rule \w+:)", file.read_text(), flags=re.MULTILINE)[1:]:
            runs = re.findall(r"-m (keyred[\w.]*)", block)
            digests = re.findall(r'code_digest\("([\w.]+)"\)', block)
            assert digests, f"{file.name}: {block.splitlines()[0]} has no code param"
            if runs:
                assert runs == digests and runs[0].startswith("keyred.stages."), (file.name, block.splitlines()[0])
                checked += 1
    assert checked >= 10


# ------------------------------------------------------------- Snakemake as the catalog expects

# What `snakemake --lint` prints around its findings when there are none.
LINT_NOTICES = ("Using workflow specific profile profiles/default for setting default command line arguments.",
                "Congratulations, your workflow is in a good condition!")


def test_snakemake_lint_finds_nothing(workdir):
    result = snakemake(workdir, "--lint", check=False)
    printed = [line for line in (result.stdout + result.stderr).splitlines() if line.strip()]
    assert result.returncode == 0 and set(printed) <= set(LINT_NOTICES), "\n".join(printed)


def test_snakefile_and_rules_are_snakefmt_formatted():
    """`snakefmt --check` with the settings of pyproject.toml ([tool.snakefmt])."""
    result = subprocess.run([sys.executable, "-m", "snakefmt", "--check", "--config", "pyproject.toml", "Snakefile",
                             "workflow/rules"], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, f"run `snakefmt Snakefile workflow/rules`:\n{result.stdout}{result.stderr}"


def rule_blocks():
    """(file name, rule name, text) of every rule of workflow/rules."""
    for file in sorted((REPO / "workflow" / "rules").glob("*.smk")):
        for block in re.split(r"^(?=rule \w+:)", file.read_text(), flags=re.MULTILINE)[1:]:
            yield file.name, re.match(r"rule (\w+):", block)[1], block


def test_every_rule_that_runs_something_has_a_log_a_benchmark_and_its_software():
    """A log and a benchmark file (the same path under results/benchmarks/, .tsv), the conda
    environment, and the interpreter as a param (the project's venv, or the environment's python
    under --sdm conda); tables and figures (script rules) run on the submitting host."""
    checked = set()
    for file, name, block in rule_blocks():
        if not re.search(r"^    (shell|script):", block, flags=re.MULTILINE):
            continue
        log = re.search(r"^    log:\n        log_path\((.*)\),\n", block, flags=re.MULTILINE)
        benchmark = re.search(r"^    benchmark:\n        benchmark_path\((.*)\)\n", block, flags=re.MULTILINE)
        assert log and benchmark, f"{file}: rule {name} needs a log and a benchmark"
        assert benchmark[1] == re.sub(r'\.log"$', '.tsv"', log[1]), f"{file}: rule {name}: benchmark beside its log"
        assert '    conda:\n        "../envs/keyred.yaml"\n' in block, f"{file}: rule {name}"
        if "    shell:" in block:
            assert "python=interpreter()" in block and re.search(r'"(exec )?\{params.python\} -m keyred\.stages\.',
                                                                 block), name
        else:
            assert "    localrule: True\n" in block, f"{file}: rule {name} (tables and figures) should be local"
        checked.add(name)
    assert {"train_lm", "reduce", "state_rank_model", "bench_tables", "training_loss_table"} <= checked
    snakefile = (REPO / "Snakefile").read_text()
    targets = re.split(r"^(?=rule \w+:|    rule:)", snakefile, flags=re.MULTILINE)[1:]
    assert len(targets) >= 9 and all("localrule: True\n" in target for target in targets)
    assert (REPO / "workflow" / "envs" / "keyred.yaml").is_file()
    assert (REPO / "workflow" / "envs" / "keyred.post-deploy.sh").is_file()


def test_short_jobs_share_a_cluster_job_only_on_a_cluster(workdir):
    """The state-rank jobs form group state_rank (the SLURM profile submits 8 per sbatch job);
    a local run ignores groups and lists each job alone."""
    grouped = {name for _, name, block in rule_blocks() if '    group:\n        "state_rank"\n' in block}
    assert grouped == {"state_rank_model", "state_tracking_rank"}
    profile = yaml.safe_load((REPO / "profiles" / "slurm" / "profile.yaml").read_text())
    assert profile["group-components"] == ["state_rank=8"]
    result = snakemake(workdir, "-n", "--cores", "2", "--forceall", "state_rank")
    assert planned_jobs(result.stdout)["state_rank_model"] == 11 and "group job" not in result.stdout


# ------------------------------------------------------------- the plans before and after the redesign

CONFIGS = {"default": (), **{path.stem: ("--configfile", f"configs/{path.name}", "--replace-workflow-config")
                             for path in sorted((REPO / "configs").glob("*.yaml"))}}
# The stage modules the recorded plans call, and those that replaced them.
MODULE_PATHS = {"keyred.corpus": "keyred.stages.corpus", "keyred.tokenizer": "keyred.stages.tokenizer",
                "keyred.packing": "keyred.stages.packing", "keyred.train": "keyred.stages.train",
                "keyred.evaluate": "keyred.stages.evaluate", "keyred.reduce": "keyred.stages.reduce",
                "keyred.analysis": "keyred.stages.analyse", "keyred.state_tracking": "keyred.stages.track"}
# Their commands changed to --spec on purpose; tests/test_bench.py compares those. Their outputs,
# logs, wildcards and resources are compared here.
BENCH_RULES = ("bench_mixer", "bench_decode", "bench_models")
# Options added on purpose since the recording: a state-tracking run resumes after a kill and reads
# its word problems from the files of its group and seed (train only with train_samples > 0).
ADDED_OPTIONS = {"state_tracking_run": (
    r"--spec '(?P<spec>[^']*)'(?P<middle>.*) --out "
    r"(?P<out>(?P<results>\S+)/state_tracking/(?P<group>\w+)/\S+/seed(?P<seed>\d+)) >",
    lambda m: f"--spec '{m['spec']}'{m['middle']} --out {m['out']} " + "".join(
        f"--{name}-data {m['results']}/data/word_problems/{m['group']}/seed{m['seed']}/{name}.csv "
        for name in (["train"] if json.loads(m["spec"])["train"]["train_samples"] else []) + ["validation", "test"])
    + f"--resume-dir {m['out']}/resume >"),
    # a reduce job keeps its finished ratios and LoRA resume state beside its output until it is written
    "reduce": (r"--out (?P<out>\S+) >", lambda m: f"--out {m['out']} --resume-dir {m['out']}.resume >")}
# Added on purpose since the recording, with values of the config: a training job is told the
# evaluation's length-extrapolation windows, to refuse a seq_len the test split cannot hold.
ADDED_CONFIG_OPTIONS = {"train_lm": (
    r"(?P<resume>--resume-dir \S+) >",
    lambda m, config: f"{m['resume']} --heldout-windows {config['evaluate']['extrapolation_factor']} "
                      f"{config['evaluate']['extrapolation_sequences']} >")}
# Jobs added on purpose since the recording: the word problems of each group and seed.
ADDED_RULES = ("state_tracking_data", "paper_tables", "recall_data", "recall_train", "recall_reduce", "recall_tables",
               "state_tracking_pruning", "state_tracking_pruning_table", "state_tracking_pruning_figure")
# Outputs added on purpose since the recording: the extrapolation loss per block of training context.
ADDED_OUTPUTS = {"evaluation_tables": (r"(\S+)/tables/length_extrapolation\.csv, ",
                                       r"\1/tables/length_extrapolation.csv, \1/tables/length_extrapolation_blocks.csv, "),
                 # the per-model rank correlations and the effective rank by model
                 "state_rank_tables": (r"(\S+)/figures/state_rank_vs_perplexity\.png$",
                                       r"\1/figures/state_rank_vs_perplexity.png, \1/tables/state_rank_correlation.csv, "
                                       r"\1/figures/effective_rank_by_model.png")}
# Rules whose command starts with `exec` since the recording: a training's signals reach it directly.
EXEC_RULES = ("train_lm", "state_tracking_run", "reduce")
# Config keys added on purpose since the recording, at their defaults: the hub revisions, a model's
# preset and fla overrides, the hub length-extrapolation sources.
ADDED_EVALUATE_KEYS = {"extrapolation_sources": {}, "bootstrap_iters": 1000}
ADDED_SPEC_KEYS = {"corpus": lambda spec: {**spec, "hub_revision": None},
                   "tokenizer": lambda spec: {**spec, "hub_revision": None},
                   "train_lm": lambda spec: {**spec, "model": {**spec["model"], "revision": None, "preset": None,
                                                               "fla": {}}},
                   "evaluate_lm": lambda spec: {**spec, **ADDED_EVALUATE_KEYS},
                   "reduce": lambda spec: {**spec, "evaluate": {**spec["evaluate"], **ADDED_EVALUATE_KEYS},
                                           "prune": {**spec["prune"], "drrqr_sampling": "positions"}}}
RECORDED = REPO / "tests" / "data" / "dry_run_before"


def with_new_module_paths(job: dict, config: dict) -> dict:
    """A job of a recorded plan with its stage module renamed by MODULE_PATHS, the ADDED_OPTIONS,
    the ADDED_CONFIG_OPTIONS (of the plan's `config`) and the ADDED_SPEC_KEYS (bench commands left out)."""
    job = dict(job)
    if job["rule"] in ADDED_OUTPUTS:
        job["output"] = re.sub(*ADDED_OUTPUTS[job["rule"]], job["output"], count=1)
    if job["rule"] in BENCH_RULES:
        job.pop("command")
        return job
    if job["rule"] in ADDED_OPTIONS:
        job["command"] = re.sub(*ADDED_OPTIONS[job["rule"]], job["command"], count=1)
    if job["rule"] in ADDED_CONFIG_OPTIONS:
        pattern, added = ADDED_CONFIG_OPTIONS[job["rule"]]
        job["command"] = re.sub(pattern, lambda m: added(m, config), job["command"], count=1)
    if job["rule"] in ADDED_SPEC_KEYS:
        spec = ADDED_SPEC_KEYS[job["rule"]](json.loads(re.search(r"--spec '([^']*)'", job["command"])[1]))
        job["command"] = re.sub(r"--spec '[^']*'", lambda _: f"--spec '{json.dumps(spec, sort_keys=True)}'",
                                job["command"], count=1)
    for old, new in MODULE_PATHS.items():
        if job["command"].startswith(f"PYTHON -m {old} "):
            job["command"] = job["command"].replace(f"PYTHON -m {old} ", f"PYTHON -m {new} ", 1)
            break
    if job["rule"] in EXEC_RULES:
        job["command"] = f"exec {job['command']}"
    return job


@pytest.fixture(scope="module")
def plans(tmp_path_factory):
    """The dry-run plan (every job forced) of the default config and of each config in configs/."""
    folder = copy_workflow(tmp_path_factory.mktemp("plans"))
    shutil.copytree(REPO / "configs", folder / "configs")
    return {name: dry_run_plan(folder, *args) for name, args in CONFIGS.items()}


@pytest.mark.parametrize("name", [name for name in CONFIGS if (RECORDED / f"{name}.json").is_file()])
def test_dry_run_plan_equals_the_one_recorded_before_the_redesign(plans, name):
    """Jobs, outputs, logs, wildcards, resources and shell commands, modulo the stage module paths.
    config.yaml's plan is no longer compared: its experiments changed on purpose after the redesign
    (the recall and DeltaProduct experiments, a smaller language-model reduction grid)."""
    recorded = [with_new_module_paths(job, workflow_config(name))
                for job in json.loads((RECORDED / f"{name}.json").read_text())]
    planned = [{key: value for key, value in job.items() if not (key == "command" and job["rule"] in BENCH_RULES)}
               for job in plans[name] if job["rule"] not in ADDED_RULES]
    assert [job["rule"] for job in planned] == [job["rule"] for job in recorded]
    for before, after in zip(recorded, planned):
        assert after == before


def workflow_config(name: str) -> dict:
    """The config a dry run of `name` uses, with threads at most the dry run's --cores 2 (as Snakemake does)."""
    from keyred.config import load_config

    config = load_config(REPO / ("config.yaml" if name == "default" else f"configs/{name}.yaml"))
    return {**config, "threads": min(config["threads"], 2)}


# rule -> the `keyred` stage that runs its job with --config, and the choice its wildcards make
CONFIG_JOBS = {
    "corpus": ("corpus", lambda w: {}), "tokenizer": ("tokenizer", lambda w: {}), "packing": ("packing", lambda w: {}),
    "train_lm": ("train", lambda w: {"model": w["model"]}),
    "evaluate_lm": ("evaluate", lambda w: {"model": w["model"]}),
    "reduce": ("reduce", lambda w: {"model": w["model"], "method": w["method"]}),
    "state_tracking_run": ("track", lambda w: {"run": f"{w['group']}/nh{w['n_h']}_{w['eig']}_L{w['layers']}"
                                                      f"/seed{w['seed']}"}),
    "state_rank_model": ("analyse", lambda w: {"model": w["model"], "method": w["method"]}),
    "bench_mixer": ("bench", lambda w: {"kind": "mixer"}), "bench_decode": ("bench", lambda w: {"kind": "decode"}),
    "bench_models": ("bench", lambda w: {"kind": "model", "model": w["model"]}),
    "state_tracking_pruning": ("track_reduce", lambda w: {"run": f"{w['group']}/nh{w['n_h']}_{w['eig']}_L{w['layers']}"
                                                                 f"/seed{w['seed']}"}),
    "recall_data": ("recall_data", lambda w: {}),
    "recall_train": ("recall_train", lambda w: {"run": f"{w['recall_model']}/dk{w['key_dim']}/seed{w['seed']}"}),
    "recall_reduce": ("recall_reduce", lambda w: {"run": f"{w['recall_model']}/dk{w['key_dim']}/seed{w['seed']}"}),
}


@pytest.mark.parametrize("name", CONFIGS)
def test_keyred_config_mode_gives_the_workflow_commands(plans, name):
    """`keyred <stage> --config FILE --model ...` builds exactly the options of the rule's shell
    command (same specs, same paths), for every job of every shipped config."""
    from keyred.cli import config_arguments

    config, compared = workflow_config(name), set()
    for job in plans[name]:
        if job["rule"] not in CONFIG_JOBS:
            continue
        stage, choose = CONFIG_JOBS[job["rule"]]
        wildcards = dict(pair.split("=") for pair in job.get("wildcards", "").split(", ") if pair)
        choice = argparse.Namespace(**{"model": None, "method": None, "run": None, "kind": None, **choose(wildcards)})
        words = shlex.split(job["command"].removeprefix("exec "))
        assert words[:3] == ["PYTHON", "-m", f"keyred.stages.{stage}"] and words[-3] == ">" and words[-1] == "2>&1"
        assert config_arguments(stage, config, choice) == words[3:-3], job["rule"]
        compared.add(job["rule"])
    assert {"corpus", "train_lm", "evaluate_lm", "state_tracking_run", "bench_mixer"} <= compared


LANGUAGE_MODELS = ("deltanet_tiny", "dp1_tiny", "dp2_tiny", "dp3_tiny", "gated_deltanet_tiny")
REDUCED_MODELS = ("deltanet_tiny", "gated_deltanet_tiny", "dp2_tiny")


@pytest.mark.slow
def test_default_dag_end_to_end_and_incremental_reruns(workdir):
    snakemake(workdir, "--cores", "2")
    results = workdir / "results"
    check_language_models(results)
    check_reduction_and_bench(results)
    check_state_tracking(results)
    check_recall(results)
    for figure in ("training_loss.png", "length_extrapolation.png", "reduction.png", "key_dim_scaling.png",
                   "quality_vs_speed.png", "state_rank_over_time.png", "state_rank_heatmap.png",
                   "state_rank_vs_perplexity.png", "effective_rank_by_model.png", "state_tracking_rank.png",
                   "state_tracking_S3.png", "state_tracking_outcomes.png", "state_tracking_pruning.png",
                   "recall_reduction.png", "recall_capacity.png"):
        assert (results / "figures" / figure).read_bytes()[:4] == b"\x89PNG", figure
    assert not list(results.rglob("*.tmp")), "temporary files left behind"

    # nothing changed: nothing to do
    assert planned_jobs(snakemake(workdir, "-n", "--cores", "2").stdout) == {}
    # a config value of one model re-runs that model's training and what depends on it
    name = write_yaml(workdir / "changed.yaml",
                      {"models": {"gated_deltanet_tiny": {"family": "gated_deltanet", "size": "small"}}})
    result = snakemake(workdir, "-n", "--cores", "2", "--configfile", "config.yaml", name)
    assert planned_jobs(result.stdout) == {"train_lm": 1, "training_loss_table": 1, "evaluate_lm": 1,
                                           "evaluation_tables": 1, "reduce": 2, "reduction_tables": 1,
                                           "paper_tables": 1, "bench_models": 1, "bench_tables": 1,
                                           "state_rank_model": 3, "state_rank_tables": 1, "all": 1, "total": 15}
    assert "model=gated_deltanet_tiny" in result.stdout and "model=deltanet_tiny" not in result.stdout
    # a code change of one stage re-runs only that stage (and the tables that read its output)
    figures = workdir / "keyred" / "figures" / "common.py"
    figures.write_text(figures.read_text() + "\n# a change\n")
    result = snakemake(workdir, "-n", "--cores", "2")
    assert planned_jobs(result.stdout) == {"training_loss_table": 1, "evaluation_tables": 1,
                                           "reduction_tables": 1, "paper_tables": 1, "state_tracking_tables": 1,
                                           "state_tracking_figures": 1, "bench_tables": 1, "state_rank_tables": 1,
                                           "state_tracking_rank_figure": 1, "recall_tables": 1,
                                           "state_tracking_pruning_table": 1, "state_tracking_pruning_figure": 1,
                                           "all": 1, "total": 13}


def check_language_models(results):
    """Every LM trains, beats the unigram baseline, is evaluated with standard errors and extrapolated to 8x."""
    for model in LANGUAGE_MODELS:
        checkpoint = results / "models" / model / "checkpoint"
        assert {"config.json", "model.safetensors", "keyred.json"} <= {p.name for p in checkpoint.iterdir()}
        assert (results / "logs" / "train_lm" / f"{model}.log").stat().st_size > 0
    table = pd.read_csv(results / "tables" / "training_loss.csv")
    assert set(table["model"]) == set(LANGUAGE_MODELS)
    for model, rows in table.groupby("model"):
        final = rows.iloc[-1]
        assert final["loss"] < rows["loss"].iloc[0] - 1.0, model
        assert final["val_loss"] < final["unigram_val_loss"] - 0.5, (model, final)   # perplexity far below unigram
    assert set(table.loc[table["model"] == "dp3_tiny", "n_h"]) == {3}
    evaluation = pd.read_csv(results / "tables" / "evaluation.csv")
    assert set(evaluation["model"]) == set(LANGUAGE_MODELS)
    assert {("heldout_perplexity", "bits_per_byte"), ("heldout_last_word", "acc"), ("assoc_recall", "acc")} <= \
        set(zip(evaluation["task"], evaluation["metric"]))
    assert evaluation["value"].notna().all()
    bits = evaluation[evaluation["metric"] == "bits_per_byte"]
    assert (bits["stderr"] > 0).all()
    extrapolation = pd.read_csv(results / "tables" / "length_extrapolation.csv")
    assert extrapolation.groupby("model")["position"].max().tolist() == [8 * 128] * len(LANGUAGE_MODELS)


def check_reduction_and_bench(results):
    """Two methods at 50% on three LMs with paired differences, the paper tables, bench per shape, ranks."""
    reduction = pd.read_csv(results / "tables" / "reduction.csv")
    reduced = reduction[reduction["stage"] != "unpruned"]
    assert len(reduced.groupby(["model", "method", "ratio", "stage"])) == 3 * 2 * 1 * 2
    assert reduced["value"].notna().all()
    bits = reduced[reduced["metric"] == "bits_per_byte"]
    assert (bits["delta_stderr"] > 0).all() and (bits["delta_stderr"] < bits["stderr"]).all()
    for folder in (results / "reduction" / "deltanet_tiny").iterdir():
        assert {"ratio0.5", "evaluation.csv"} <= {p.name for p in folder.iterdir()}
    for family in ("delta_net", "gated_deltanet", "gated_deltaproduct"):
        paper = pd.read_csv(results / "tables" / f"paper_{family}.csv")
        assert len(paper) == 1 + 2 * 2 and "avg accuracy" in paper.columns, family
    # speed and memory: every key dim, the state exactly proportional to d_k, one measurement per shape
    decode = pd.read_csv(results / "tables" / "bench_decode.csv")
    mixer = pd.read_csv(results / "tables" / "bench_mixer.csv")
    assert sorted(decode["d_k"].unique()) == sorted(mixer["d_k"].unique()) == [32, 64, 128]
    state = decode.groupby("d_k")["recurrent_state_bytes_per_seq"].first()
    assert state[128] == 2 * state[64] == 4 * state[32] == 2 * 2 * 128 * 128 * 4  # layers x heads x d_k x d_v x 4
    assert len(mixer) == 2 * 3 * 2 and (mixer["tokens_per_s"] > 0).all()
    models = pd.read_csv(results / "tables" / "bench_models.csv")
    assert len(models) == 3 * 2 and (models["tokens_per_s"] > 0).all()
    # state rank: every analysed checkpoint, utilisation in [0, 1]
    ranks = pd.read_csv(results / "tables" / "state_rank_summary.csv")
    assert len(ranks.groupby(["model", "method", "ratio", "stage"])) == len(LANGUAGE_MODELS) + 3 * 2
    assert ranks["utilisation"].between(0, 1).all() and (ranks["effective_rank"] >= 1).all()
    correlation = pd.read_csv(results / "tables" / "state_rank_correlation.csv")
    assert set(REDUCED_MODELS) <= set(correlation["model"])


def check_state_tracking(results):
    """S3 shows the known pattern in every seed; every run is pruned by every method, before and after recovery."""
    summary = pd.read_csv(results / "tables" / "state_tracking_summary.csv")
    assert len(summary) == 8 and set(summary["seed"]) == {0, 1}
    for _, run in summary.iterrows():
        if run["model"] == "DP_2[-1,1]":
            assert run["seq_acc_at_train_length"] == 1.0 and run["longest_solved"] > run["train_length"], run
        else:
            assert run["seq_acc_at_train_length"] < 0.5 and run["longest_solved"] < run["train_length"], run
    tracking_ranks = pd.read_csv(results / "tables" / "state_tracking_rank.csv")
    assert tracking_ranks["checkpoint"].nunique() == 8
    pruning = pd.read_csv(results / "tables" / "state_tracking_pruning.csv")
    methods = pruning[pruning["method"] != "none"]
    assert set(methods["method"]) == {"drrqr", "random"} and set(methods["ratio"]) == {0.5}
    assert methods.groupby(["method", "stage"]).size().eq(8).all()


def check_recall(results):
    """Every recall model learns MQAR at full d_k in every seed; every method is scored before and after LoRA."""
    summary = pd.read_csv(results / "tables" / "recall_summary.csv")
    unpruned = summary[summary["stage"] == "unpruned"].set_index("model")
    assert set(unpruned.index) == {"deltanet", "gated_deltanet", "deltaproduct2"} and (unpruned["seeds"] == 3).all()
    # every family learns the task (some seeds of the gated ones stay near chance: reported, not dropped)
    assert (unpruned["max"] > 0.9).all() and unpruned.loc["deltanet", "mean"] > 0.9, unpruned
    at_half = summary[(summary["model"] == "deltanet") & (summary["ratio"] == 0.5) & (summary["stage"] == "pruned")]
    by_method = at_half.set_index("method")["mean"]
    assert by_method["drrqr"] > by_method["random"] + 0.1, by_method      # the keys matter here
    reduced = summary[summary["stage"] != "unpruned"]
    assert len(reduced) == 3 * 8 * 1 * 2 and (reduced["seeds"] == 3).all()
    capacity = pd.read_csv(results / "tables" / "recall_capacity.csv")
    trained = capacity[(capacity["source"] == "trained") & (capacity["model"] == "deltanet")]
    assert sorted(trained["key_dim"].unique()) == [8, 16] and set(trained["pairs"]) == {4, 8, 16, 24, 32}


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def chromium(page, *options, user_data):
    """Run headless Chromium on a local page (JavaScript runs for up to 10 virtual seconds)."""
    command = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
               f"--user-data-dir={user_data}", "--virtual-time-budget=10000", *options, page.as_uri()]
    return subprocess.run(command, capture_output=True, text=True, timeout=120)


def show_result(report_html: str, key: str) -> str:
    """The report with a script that opens one result as a click on it would (the report's own app)."""
    script = (f"<script>setTimeout(function () {{ app.setView({{content: 'img', "
              f"contentPath: results[{key!r}].data_uri, resultPath: {key!r}}}); }}, 500);</script>")
    head, body_end, tail = report_html.rpartition("</body>")  # the page's own end (the scripts hold others)
    return head + script + body_end + tail


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (apt-get install chromium)")
def test_report_renders_every_figure_in_chromium(workdir, tmp_path):
    """snakemake --report on the default run: every figure and table is in the self-contained HTML,
    and headless Chromium shows each figure (its PNG bytes in an <img>; screenshots saved)."""
    results = workdir / "results"
    if not (results / "tables" / "reduction.csv").exists():  # the end-to-end test ran first, normally
        snakemake(workdir, "--cores", "2")
    report = results / "report.html"
    snakemake(workdir, "--report", str(report))
    html = report.read_text()
    outputs = [line.split("`")[3].replace("<group>", "*") for line in (REPO / "README.md").read_text().splitlines()
               if line.startswith(("| `fig_", "| `table_"))]
    assert len(outputs) == 36
    figures = []
    for output in outputs:
        for file in results.glob(output):
            figures += [file] if file.suffix == ".png" else []
            assert file.name in html, f"{file} is not in the report"
            if file.suffix == ".png":
                assert base64.b64encode(file.read_bytes()).decode()[:2000] in html, f"{file}'s image is not embedded"
    assert "Speed and memory" in html and "State rank" in html and "is exactly proportional to d_k" in html

    screenshots = results / "report_screenshots"
    screenshots.mkdir(exist_ok=True)
    rendered = chromium(report, "--dump-dom", user_data=tmp_path / "chromium")
    assert rendered.returncode == 0, rendered.stderr
    assert "Snakemake" in rendered.stdout and "Speed and memory" in rendered.stdout  # the app drew its menu
    keys = re.findall(r'"(results/figures/[^"]+\.png)": \{"name"', html)
    assert set(keys) == {str(file.relative_to(workdir)) for file in figures}  # (state_tracking_* matches 3)
    for key in keys:
        page = tmp_path / "page.html"
        page.write_text(show_result(html, key))
        dom = chromium(page, "--dump-dom", user_data=tmp_path / "chromium").stdout
        image = base64.b64encode((workdir / key).read_bytes()).decode()
        assert re.search(r'<img[^>]+src="data:image/png;[^"]*base64,' + re.escape(image[:200]), dom), \
            f"Chromium does not show {key}"
        shot = screenshots / Path(key).name
        chromium(page, f"--screenshot={shot}", "--window-size=1400,1000", user_data=tmp_path / "chromium")
        assert shot.stat().st_size > 20_000, f"screenshot of {key} looks blank"
