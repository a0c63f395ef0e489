#!/usr/bin/env bash
# Set up the environment (once) and run the test suite. Extra arguments go to pytest.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
exec python -m pytest "$@"
