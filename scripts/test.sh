#!/usr/bin/env bash
# Run the test suite in the project's virtual environment (created on first use).
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -k export`.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/env.sh || exit 1
export WANDB_MODE="${WANDB_MODE_TESTS:-disabled}" PYTHONHASHSEED=0
python -m pytest -q --durations=15 "$@"
rc=$?
if [ "$rc" -eq 5 ]; then
  echo "[acip] ERROR: pytest collected no tests (exit code 5); treating as a failure." >&2
fi
exit "$rc"
