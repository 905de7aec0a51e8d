#!/usr/bin/env bash
# Installs everything, then runs the test suite (tiny random models + the embedded SmolLM2).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
# one worker per core (pytest-xdist), each test file in one worker so that a module's fixtures (the
# official scorers' runs, the two-process grid) are built once; tests/conftest.py splits torch's threads
python -m pytest -q -n auto --dist loadfile "$@"
