#!/usr/bin/env bash
# Installs what the test command needs on a clean machine: nox (which builds each
# session's environment itself: a CPU build of torch, triton, pytest).
set -euo pipefail
python3 -m pip install --quiet --disable-pip-version-check "nox>=2024.4.15"
