#!/usr/bin/env bash
# Installs everything, then runs the test suite (tiny random models + the embedded SmolLM2).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
python -m pytest -q "$@"
