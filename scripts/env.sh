# Source this file: creates (once) and activates the project's virtual environment in .venv.
# Used by scripts/run.sh and scripts/test.sh.
#
# Installs the pinned environment of requirements.lock (made by scripts/lock.sh), then keyred
# itself with --no-deps: nothing is resolved again, so every machine gets the same releases.
# torch comes first, with its own dependencies (pinned by the lock where it holds them): the CPU
# build satisfies torch==2.13.0 with what the lock holds, PyPI's Linux build (CUDA) also brings
# its nvidia-* wheels, which the lock leaves out. Re-installs only when pyproject.toml, the lock
# or the torch requirement changes.
#   KEYRED_VENV    the venv folder (default .venv)
#   KEYRED_PYTHON  the interpreter that creates it (default python3, >= 3.11)
#   KEYRED_TORCH   the torch requirement (default: the lock's torch line); "" keeps the installed torch
#   KEYRED_LOCK    the lock file (default requirements.lock); "" resolves pyproject.toml's ranges
#                  instead (newest releases today), e.g. for a machine whose torch needs other pins
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${KEYRED_VENV:-$repo_root/.venv}"
lock="${KEYRED_LOCK-$repo_root/requirements.lock}"
if [ -n "$lock" ] && [ ! -f "$lock" ]; then
    echo "keyred: the lock file $lock does not exist (make it with bash scripts/lock.sh, or set KEYRED_LOCK=\"\")." >&2
    exit 1
fi
locked_torch="$( [ -n "$lock" ] && grep -E '^torch==' "$lock" || echo 'torch==2.13.0')"   # the release tested on CPU
torch_requirement="${KEYRED_TORCH-$locked_torch}"

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

keyred_install_locked() {
    local pip=("$venv/bin/python" -m pip install --quiet) rest
    rest="$(mktemp)"
    grep -v -E '^torch==' "$lock" > "$rest"          # the lock without its torch line
    "${pip[@]}" --no-deps $(grep -E '^(pip|setuptools|wheel)==' "$lock")
    if [ -n "$torch_requirement" ]; then
        "${pip[@]}" --constraint "$rest" "$torch_requirement"
    fi
    "${pip[@]}" --no-deps --no-build-isolation --requirement "$rest"
    "${pip[@]}" --no-deps --no-build-isolation --editable "$repo_root"
    rm -f "$rest"
    "$venv/bin/python" -m pip check >&2 || echo "[keyred] warning: the environment does not satisfy every" \
        "requirement (pip check above): KEYRED_TORCH or the lock may need other pins (bash scripts/lock.sh)" >&2
}

stamp="$venv/.keyred-installed"
want="$(cat "$repo_root/pyproject.toml"; [ -z "$lock" ] || cat "$lock"; echo "lock=$lock torch=$torch_requirement")"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
    echo "[keyred] installing dependencies into $venv (first run takes a few minutes)" >&2
    if [ -n "$lock" ]; then
        keyred_install_locked
    else
        "$venv/bin/python" -m pip install --quiet --upgrade pip
        if [ -n "$torch_requirement" ]; then
            "$venv/bin/python" -m pip install --quiet "$torch_requirement"
        fi
        "$venv/bin/python" -m pip install --quiet -e "$repo_root[test]"
    fi
    printf '%s' "$want" > "$stamp"
fi

export PATH="$venv/bin:$PATH"
export VIRTUAL_ENV="$venv"
cd "$repo_root"
