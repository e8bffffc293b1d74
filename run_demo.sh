#!/usr/bin/env bash
# Set up .venv and run the demo: synthetic dataset -> CoTr plans -> nnUNetv2_train -> nnUNetv2_predict -> Dice.
# Extra arguments go to `nnunet-plugins demo` (e.g. --workdir DIR, --epochs N).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
source "$ROOT/scripts/setup_env.sh"
cd "$ROOT"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}"
exec "$VENV/bin/nnunet-plugins" demo "$@"
