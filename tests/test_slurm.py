"""The workflow through the SLURM executor.

Always: the exact user command `snakemake --profile slurm all` resolves the bare name `slurm`
(Snakemake's own lookup) to profiles/slurm and selects the slurm executor.

Marker `slurm` (a reachable cluster; skipped otherwise): a representative part of the DAG (data,
tiny training, evaluation, one pruning method with LoRA, tables and figures) goes through
`snakemake --profile slurm`, every job through sbatch, with the same results as a local run; a
training job killed mid-way (the whole SLURM job, as a node failure would) is retried, resumes
from its last checkpoint, and finished results are not recomputed. Start a single-node cluster
on this machine with `bash scripts/local_slurm.sh start` (CI does), then
`bash scripts/test.sh -m slurm`.
"""
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

from conftest import REPO

WORKFLOW_FILES = ("Snakefile", "config.yaml", "workflow", "keyred", "profiles", "slurm")
MODEL = "deltanet_tiny"
TARGETS = ["training_loss", "evaluation", "reduction"]
RUN_TIMEOUT_S = 900


# --------------------------------------------------------------------------- the profile itself

def test_bare_profile_name_resolves_to_the_slurm_profile(monkeypatch):
    from snakemake.cli import get_profile_dir, parse_args

    monkeypatch.chdir(REPO)
    folder, file = get_profile_dir("slurm")
    assert folder.resolve() == (REPO / "profiles" / "slurm").resolve()
    assert file.name == "profile.yaml"
    _, args = parse_args(["--profile", "slurm", "all"])
    assert args.executor == "slurm" and args.targets == ["all"]
    assert args.slurm_status_command == "squeue" and args.retries == 2
    assert {"slurm_partition", "slurm_account"} <= set(args.default_resources)


def test_every_profile_entry_has_a_comment():
    for line in (REPO / "profiles" / "slurm" / "profile.yaml").read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            assert "#" in line or line.rstrip().endswith(":"), f"entry without a comment: {line!r}"


def copy_workflow(destination: Path, config: dict) -> Path:
    """The workflow (with the root `slurm` profile link) in `destination`, config.yaml replaced by `config`."""
    destination.mkdir(parents=True)
    for name in WORKFLOW_FILES:
        source = REPO / name
        if source.is_symlink():
            os.symlink(os.readlink(source), destination / name)
        elif source.is_dir():
            shutil.copytree(source, destination / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(source, destination / name)
    (destination / "config.yaml").write_text(yaml.safe_dump(config))
    return destination


def small_config(**train) -> dict:
    """config.yaml with one tiny model, a short training and one pruning method at one ratio."""
    config = yaml.safe_load((REPO / "config.yaml").read_text())
    config["models"] = {MODEL: {"family": "delta_net", "size": "tiny"}}
    config["train"].update(steps=60, log_every=10, eval_every=30, checkpoint_every=10, eval_sequences=16, **train)
    config["evaluate"].update(max_documents=4, last_word_samples=20, recall_samples=20, extrapolation_sequences=2)
    config["reduction"].update(models=[MODEL], methods=["l1"], ratios=[0.5])
    config["recall"]["models"] = {}                       # the recall experiment is tested elsewhere
    config["state_tracking"]["reduction"]["methods"] = []
    config["reduction"]["finetune"].update(steps=10, eval_sequences=8)
    return config


def test_slurm_profile_dry_run_from_the_repository_root(tmp_path):
    workdir = copy_workflow(tmp_path / "wf", small_config())
    result = snakemake(workdir, "--profile", "slurm", "all", "-n")
    assert "Using profiles slurm and workflow specific profile profiles/default" in result.stderr
    resources = dict(re.findall(r"rule (\w+):.*?resources: ([^\n]*)", result.stdout, flags=re.S))
    assert "slurm_partition=" in resources["train_lm"] and "slurm_account=" in resources["train_lm"]
    assert "gpu=0" in resources["train_lm"] and "gpu=0" in resources["corpus"]  # device cpu


# ------------------------------------------------------------------------------ helpers

def snakemake(workdir: Path, *args, env=None, timeout=RUN_TIMEOUT_S):
    """Run snakemake in `workdir` (keyred of the copy importable); fail with its output if it fails."""
    env = {**(env or os.environ), "PYTHONPATH": str(workdir)}
    result = subprocess.run([sys.executable, "-m", "snakemake", *args], cwd=workdir, env=env,
                            capture_output=True, text=True, timeout=timeout)
    if result.returncode != 0:
        raise AssertionError(f"snakemake {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}")
    return result


def slurm_args() -> list[str]:
    """The user's profile; the local cluster's partition and a made-up account filled in, as a user
    would; status checks every few seconds instead of 40 s; SLURM logs kept for inspection."""
    return ["--profile", "slurm", *TARGETS, "--default-resources", "slurm_partition=debug",
            "slurm_account=keyred-ci", "--slurm-init-seconds-before-status-checks", "2",
            "--slurm-keep-successful-logs"]


def main_log(workdir: Path) -> str:
    return "\n".join(path.read_text() for path in sorted((workdir / ".snakemake" / "log").glob("*.snakemake.log")))


def submitted(log: str) -> list[tuple[str, int]]:
    """(rule, SLURM job id) of every job the run submitted, in order, from its main log."""
    return [(rule, int(slurm_id)) for slurm_id, rule in
            re.findall(r"has been submitted with SLURM jobid (\d+) \(log: \S*/slurm_logs/rule_(\w+)/", log)]


def assert_same_results(results: Path, reference: Path) -> None:
    """The result tables of two runs agree (timings aside)."""
    timings = {"tokens_per_s", "elapsed_s", "seconds", "wall_s"}
    for table in ("training_loss.csv", "evaluation.csv", "length_extrapolation.csv", "reduction.csv"):
        ours, theirs = (pd.read_csv(root / "tables" / table) for root in (results, reference))
        keep = [column for column in theirs.columns if column not in timings]
        assert list(ours.columns) == list(theirs.columns), table
        pd.testing.assert_frame_equal(ours[keep], theirs[keep], check_exact=True, obj=table)
    for figure in ("training_loss.png", "length_extrapolation.png", "reduction.png"):
        assert (results / "figures" / figure).read_bytes()[:4] == b"\x89PNG"


# ---------------------------------------------------------------------------- on a real cluster

@pytest.fixture(scope="module")
def cluster():
    """The environment of the SLURM clients; skips when no cluster answers."""
    env = dict(os.environ)
    if shutil.which("sinfo") is None:
        pytest.skip("no SLURM cluster: sinfo is not installed (start one: bash scripts/local_slurm.sh start)")
    probe = subprocess.run(["sinfo", "-h", "-o", "%P %a %T"], env=env, capture_output=True, text=True, timeout=30)
    if probe.returncode != 0 or not probe.stdout.strip():
        reason = (probe.stderr.strip().splitlines() or ["no partitions"])[-1]
        pytest.skip(f"no SLURM cluster answers sinfo ({reason}; "
                    f"start one: bash scripts/local_slurm.sh start)")
    return env


@pytest.fixture(scope="module")
def local_results(tmp_path_factory):
    """The same DAG run locally with `snakemake -c 2`: the reference results."""
    workdir = copy_workflow(tmp_path_factory.mktemp("local") / "wf", small_config())
    snakemake(workdir, "-c", "2", *TARGETS)
    return workdir / "results"


@pytest.mark.slurm
def test_dag_through_slurm_equals_local_run(cluster, local_results, tmp_path):
    workdir = copy_workflow(tmp_path / "wf", small_config())
    snakemake(workdir, *slurm_args(), env=cluster)
    jobs = submitted(main_log(workdir))
    rules = sorted(rule for rule, _ in jobs)
    # the table and figure rules are local rules: they run on this host, not through sbatch
    assert rules == sorted(["corpus", "tokenizer", "packing", "train_lm", "evaluate_lm", "reduce"]), jobs
    assert len({slurm_id for _, slurm_id in jobs}) == len(jobs)
    # every job left its SLURM log, named by its SLURM job id, in the plugin's log folder
    logs = {int(path.stem) for path in (workdir / ".snakemake" / "slurm_logs").rglob("*.log")}
    assert {slurm_id for _, slurm_id in jobs} <= logs
    assert_same_results(workdir / "results", local_results)


@pytest.mark.slurm
def test_killed_training_job_is_retried_and_resumes(cluster, local_results, tmp_path):
    workdir = copy_workflow(tmp_path / "wf", small_config())
    results = workdir / "results"
    resume_state = results / "models" / MODEL / "resume" / "state.pt"
    output = tmp_path / "snakemake.out"
    with open(output, "w") as out:
        run = subprocess.Popen([sys.executable, "-m", "snakemake", *slurm_args()], cwd=workdir,
                               env={**cluster, "PYTHONPATH": str(workdir)}, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + RUN_TIMEOUT_S
        while not resume_state.exists():
            assert run.poll() is None, f"snakemake ended before training saved a resume state:\n{output.read_text()}"
            assert time.monotonic() < deadline, "no resume state within the time limit"
            time.sleep(0.5)
        data = {path: path.stat().st_mtime_ns for path in (results / "data").rglob("*") if path.is_file()}
        train_job = [slurm_id for rule, slurm_id in submitted(main_log(workdir)) if rule == "train_lm"]
        assert len(train_job) == 1
        # as on a node failure: every process of the job dies at once, no clean-up
        subprocess.run(["scancel", "--signal=KILL", "--full", str(train_job[0])], env=cluster, check=True)
        run.wait(timeout=RUN_TIMEOUT_S)
    except BaseException:
        run.send_signal(signal.SIGINT)  # Snakemake cancels its SLURM jobs on SIGINT
        run.wait(timeout=120)
        raise
    assert run.returncode == 0, output.read_text()

    log = main_log(workdir)
    train_jobs = [slurm_id for rule, slurm_id in submitted(log) if rule == "train_lm"]
    assert len(train_jobs) == 2 and train_jobs[0] == train_job[0], train_jobs
    # the failure names the rule's log file
    failure = log[log.index("Error in rule train_lm"):]
    assert f"results/logs/train_lm/{MODEL}.log" in failure[:2000], failure[:2000]
    # the retried job continued from the last resume state
    train_log = (results / "logs" / "train_lm" / f"{MODEL}.log").read_text()
    resumed = re.search(r"resuming from .*state\.pt at step (\d+)", train_log)
    assert resumed and int(resumed[1]) > 0
    assert not resume_state.parent.exists()  # removed once the final checkpoint was written
    # finished results were kept, not recomputed; the resumed run ends where an uninterrupted one does
    assert {path: path.stat().st_mtime_ns for path in data} == data
    assert [rule for rule, _ in submitted(log)].count("corpus") == 1
    assert_same_results(results, local_results)
