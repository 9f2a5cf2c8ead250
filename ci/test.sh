#!/usr/bin/env bash
# The README's test command: the lint, cpu, triton_interpret and distributed nox sessions
# (arguments go to nox, e.g. `bash ci/test.sh -s cpu`). Installs nox first where it is
# missing; each session builds its own environment (a CPU build of torch, triton, pytest).
set -euo pipefail
cd "$(dirname "$0")/.."
if ! python3 -m nox --version >/dev/null 2>&1; then
    python3 -m pip install --quiet --disable-pip-version-check "nox>=2024.4.15"
fi
exec python3 -m nox "$@"
