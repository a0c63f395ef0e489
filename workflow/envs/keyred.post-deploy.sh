#!/usr/bin/env bash
# Run by Snakemake (`--sdm conda`) once, after it creates the environment of keyred.yaml, with that
# environment activated and the working directory of the run (the repository root) as the current
# folder: scripts/env.sh installs requirements.lock and keyred (editable: jobs run this checkout's
# code) into the conda environment instead of .venv. Snakemake rebuilds the environment when
# keyred.yaml or this file changes, not when requirements.lock does: after a new lock, remove
# .snakemake/conda (or run with --conda-cleanup-envs).
set -euo pipefail
if [ ! -f scripts/env.sh ]; then
    echo "keyred.post-deploy.sh: run Snakemake from the keyred repository root ($PWD has no scripts/env.sh)" >&2
    exit 1
fi
KEYRED_VENV="$CONDA_PREFIX" bash -c 'source scripts/env.sh'
