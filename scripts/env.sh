# Source this file: creates (once) and activates the project's virtual environment in .venv.
# Re-installs only when pyproject.toml changes. Used by scripts/run.sh and scripts/test.sh.
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${KEYRED_VENV:-$repo_root/.venv}"
# The torch release keyred is tested with. PyPI's Linux wheel of it is a CUDA build that also
# runs on CPU; set KEYRED_TORCH to another requirement (or to "" to keep what is installed).
torch_requirement="${KEYRED_TORCH-torch==2.13.0}"

python_bin="${KEYRED_PYTHON:-python3}"
if ! "$python_bin" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
    echo "keyred needs Python >= 3.11; '$python_bin' is $("$python_bin" --version 2>&1 || echo missing)." >&2
    echo "Install python3.11 (Debian: apt-get install python3 python3-venv) or set KEYRED_PYTHON." >&2
    exit 1
fi

if [ ! -x "$venv/bin/python" ]; then
    echo "[keyred] creating virtual environment in $venv" >&2
    "$python_bin" -m venv "$venv" || {
        echo "Could not create a venv: on Debian install python3-venv (apt-get install python3-venv)." >&2
        exit 1
    }
fi

stamp="$venv/.keyred-installed"
want="$(cat "$repo_root/pyproject.toml"; echo "$torch_requirement")"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
    echo "[keyred] installing dependencies into $venv (first run takes a few minutes)" >&2
    "$venv/bin/python" -m pip install --quiet --upgrade pip
    if [ -n "$torch_requirement" ]; then
        "$venv/bin/python" -m pip install --quiet "$torch_requirement"
    fi
    "$venv/bin/python" -m pip install --quiet -e "$repo_root[test]"
    printf '%s' "$want" > "$stamp"
fi

export PATH="$venv/bin:$PATH"
export VIRTUAL_ENV="$venv"
cd "$repo_root"
