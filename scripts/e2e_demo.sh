#!/usr/bin/env bash
# The main job: install, train a prefix on 500 E2E pairs with the embedded SmolLM2-135M for a few
# minutes on CPU, then decode E2E test tables with beam search. Data: ../shared/data or $PREFIXTUNE_DATA.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
RUN=${RUN:-runs/e2e-demo}
prefixtune train --task e2e --max-train-examples 500 --max-dev-examples 200 \
    --length 10 --batch-size 8 --lr 5e-4 --max-steps 60 --eval-every 20 --out "$RUN"
prefixtune generate --task e2e --split test --max-examples 10 --num-beams 5 \
    --prefix "$RUN/prefix.safetensors" --out "$RUN/test-outputs.txt"
