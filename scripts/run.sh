#!/usr/bin/env bash
# The main job on the built-in default (SmolLM2-135M + KJV), in the project's virtual environment.
# Extra arguments are passed on (Hydra overrides once the training run is wired in).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/env.sh
python scripts/baseline.py "$@"
