#!/usr/bin/env bash
# The main job on the built-in default (SmolLM2-135M on its own samples + KJV verses, data=mix): one ACIP training run with the CPU
# quickstart schedule, ending with the ratio -> held-out perplexity table (ACIP next to the
# singular-value baseline). Runs in the project's virtual environment (created on first use).
# Extra arguments are Hydra overrides, e.g. `bash scripts/run.sh acip.stop_ratio=0.4`.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/env.sh
python -m acip.compress "$@"
