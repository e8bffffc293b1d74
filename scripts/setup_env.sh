#!/usr/bin/env bash
# Create (or reuse) the virtual environment .venv and install this package with its test extras.
# Sourced by run_demo.sh and run_tests.sh; everything comes from the repository's own files.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${NNUNET_PLUGINS_VENV:-$ROOT/.venv}"
PYTHON="${PYTHON:-python3}"
if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON" -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install --quiet --upgrade pip
# a regular (non-editable) install: it also places the .pth file that registers our trainers with nnU-Net
"$VENV/bin/python" -m pip install --quiet --upgrade "$ROOT[test]"
