"""The jobs and shell commands of a Snakemake dry run as plain data, for comparing plans.

`python tests/dry_run_plan.py OUT.json [snakemake args]` records the plan of the workflow in the
current folder (every job forced, so nothing on disk changes it); the tests compare a fresh plan
with the plans recorded before the package redesign (tests/data/dry_run_before/).
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

JOB_HEADER = re.compile(r"^(local)?rule (\w+):$")
FIELDS = ("output", "log", "wildcards", "resources")


def parse_dry_run(text: str, python: str, root: str) -> list[dict]:
    """One dict per planned job: rule, output, log, wildcards, resources, command (the interpreter
    and the working folder replaced by placeholders), sorted by rule and output."""
    jobs, job = [], None
    for line in text.splitlines():
        header = JOB_HEADER.match(line.strip())
        if header:
            job = {"rule": header[2]}
            jobs.append(job)
            continue
        if job is None:
            continue
        stripped = line.strip()
        for field in FIELDS:
            if stripped.startswith(f"{field}: "):
                job[field] = stripped[len(field) + 2:]
        if stripped.startswith("Shell command: "):
            command = stripped[len("Shell command: "):]
            job["command"] = command.replace(python, "PYTHON").replace(root, "ROOT")
        if "resources" in job:
            job["resources"] = re.sub(r"tmpdir=[^,]+, ", "", job["resources"])
    return sorted(jobs, key=lambda j: (j["rule"], j.get("output", "")))


def dry_run_plan(workdir: Path, *args: str) -> list[dict]:
    """The plan of `snakemake -n -p --forceall <args>` run in `workdir`."""
    workdir = Path(workdir).resolve()
    env = {**os.environ, "PYTHONPATH": str(workdir)}
    result = subprocess.run([sys.executable, "-m", "snakemake", "-n", "-p", "--forceall", "--cores", "2", *args],
                            cwd=workdir, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise AssertionError(f"snakemake {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}")
    return parse_dry_run(result.stdout, sys.executable, str(workdir))


if __name__ == "__main__":
    out, *arguments = sys.argv[1:]
    Path(out).write_text(json.dumps(dry_run_plan(Path.cwd(), *arguments), indent=1) + "\n")
