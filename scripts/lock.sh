#!/usr/bin/env bash
# Regenerate requirements.lock, the pinned default (CPU) environment that scripts/env.sh installs.
#
#   bash scripts/lock.sh             freeze the project's venv as it is (.venv, or $KEYRED_VENV):
#                                    after adding or upgrading a package there by hand
#   bash scripts/lock.sh --upgrade   resolve pyproject.toml anew in a temporary venv (the newest
#                                    releases that its ranges allow today) and freeze that
#
# Every installed distribution is pinned with == (pip, setuptools and wheel too: env.sh installs
# with --no-build-isolation, so nothing is resolved at install time), the editable keyred left out.
# Two edits keep the lock installable beside PyPI's torch as well as beside the CPU build:
# torch's local label is dropped (torch==2.13.0 matches 2.13.0+cpu and PyPI's CUDA build), and
# nvidia-*/cuda-* wheels (what PyPI's Linux build of torch pulls in) are left out: env.sh installs
# torch with its own dependencies, so a CUDA build brings them itself.
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
lock="$repo_root/requirements.lock"

if [ "${1-}" = "--upgrade" ]; then
    venv="$(mktemp -d)/venv"
    trap 'rm -rf "$(dirname "$venv")"' EXIT
    "${KEYRED_PYTHON:-python3}" -m venv "$venv"
    "$venv/bin/python" -m pip install --quiet --upgrade pip setuptools wheel
    "$venv/bin/python" -m pip install --quiet "${KEYRED_TORCH:-torch==2.13.0}"
    "$venv/bin/python" -m pip install --quiet -e "$repo_root[test]"
elif [ -z "${1-}" ]; then
    venv="${KEYRED_VENV:-$repo_root/.venv}"
    [ -x "$venv/bin/python" ] || { echo "no venv at $venv: run bash scripts/test.sh first" >&2; exit 1; }
else
    echo "usage: bash scripts/lock.sh [--upgrade]" >&2
    exit 2
fi

"$venv/bin/python" -m pip check >&2 || {
    echo "the environment in $venv is inconsistent (pip check above); fix it before locking" >&2
    exit 1
}
frozen="$("$venv/bin/python" -m pip freeze --all --exclude-editable)"
if grep -q '^-e \|@ \|://' <<<"$frozen"; then
    echo "$venv holds packages installed from a path or URL, which a lock cannot pin:" >&2
    grep '^-e \|@ \|://' <<<"$frozen" >&2
    exit 1
fi
platform="$("$venv/bin/python" -c 'import platform, sys; print(f"Python {sys.version.split()[0]}, {platform.system()} {platform.machine()}")')"
{
    echo "# The default (CPU) environment of keyred, every package pinned: made by scripts/lock.sh"
    echo "# ($platform) and installed by scripts/env.sh; see the README's set-up section."
    grep -v -i -E '^(nvidia-|cuda-)' <<<"$frozen" | sed -E 's/^(torch==[^+]+)\+.*$/\1/'
} > "$lock.tmp"
mv "$lock.tmp" "$lock"
echo "wrote $lock ($(grep -c '==' "$lock") packages)" >&2
