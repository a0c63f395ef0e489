#!/usr/bin/env bash
# Set up the environment (once) and run the whole workflow of config.yaml on this machine.
# Extra arguments go to snakemake, e.g. `bash scripts/run.sh -n` for a dry run.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
exec snakemake "$@"  # --cores etc. come from the workflow profile profiles/default
