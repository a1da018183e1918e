#!/usr/bin/env bash
# The GPU check (docs/GPU.md): tools/gpu_check.py with the Python that has CUDA torch.
#
#   bash tools/gpu_check.sh --output DIR     # on a GPU machine, with .gpu_carry/ (see --prepare)
#   bash tools/gpu_check.sh --dry-run        # on the CPU: every step at tiny sizes
#   bash tools/gpu_check.sh --help           # all options
#
# The interpreter: $PYTHON if set; else the repository's .venv/ (`make install`) if there is one;
# else python3 (on a GPU machine, the one with its own torch and torchvision).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [[ -n "${PYTHON:-}" ]]; then
  py="$PYTHON"
elif [[ -x "$ROOT/.venv/bin/python" ]]; then
  py="$ROOT/.venv/bin/python"
else
  py=python3
fi
export PYTHONUNBUFFERED=1
exec "$py" "$ROOT/tools/gpu_check.py" "$@"
