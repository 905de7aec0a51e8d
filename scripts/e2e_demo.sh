#!/usr/bin/env bash
# The main job: install; train a prefix on 500 E2E pairs with the embedded SmolLM2-135M (60 steps,
# a few minutes on 2 CPU cores); decode all 630 E2E test tables with beam search; score them with
# the official E2E metrics. Data: ../shared/data or $PREFIXTUNE_DATA.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
RUN=${RUN:-runs/e2e-demo}
prefixtune train --task e2e --max-train-examples 500 --max-dev-examples 200 \
    --length 10 --batch-size 8 --lr 5e-4 --max-steps 60 --eval-every 20 --out "$RUN"
prefixtune generate --task e2e --split test --num-beams 5 \
    --prefix "$RUN/prefix.safetensors" --out "$RUN/test-outputs.txt"
prefixtune evaluate --task e2e --predictions "$RUN/test-outputs.txt" | tee "$RUN/test-scores.txt"
