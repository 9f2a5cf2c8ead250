#!/usr/bin/env bash
# The README's test command: the lint, cpu, triton_interpret and distributed nox sessions.
set -euo pipefail
cd "$(dirname "$0")/.."
exec python3 -m nox "$@"
