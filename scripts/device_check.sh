#!/usr/bin/env bash
# One prepared check of nnunet-plugins on an offline GPU node (details: nnunet_plugins/device_check.py).
#
#   scripts/device_check.sh prepare [--budget-mib 64]      # online machine: wheels -> .device_wheels/
#   scripts/device_check.sh run OUT_DIR [--device cuda|cpu] [--trainers ...] [--budget-s 330]
#                                                           # node: install the wheels offline, run, write
#                                                           # OUT_DIR/device_check.json and .md
#
# Variables: PYTHON (default python3: the node's interpreter with PyTorch), DEVICE_CHECK_WHEELS (the wheel
# folder, default .device_wheels in the checkout), DEVICE_CHECK_USE_INSTALLED=1 (run with the packages already
# importable by PYTHON instead of installing the wheels: the CPU test does that).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python3}"
WHEELS="${DEVICE_CHECK_WHEELS:-$ROOT/.device_wheels}"

usage() { sed -n '2,12p' "${BASH_SOURCE[0]}" >&2; exit 2; }
[ $# -ge 1 ] || usage
command="$1"; shift
case "$command" in
  prepare)
    # only the standard library is needed here: the module imports nothing else for preparing
    PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" exec "$PYTHON" -m nnunet_plugins.device_check prepare \
        --dest "$WHEELS" "$@"
    ;;
  run)
    [ $# -ge 1 ] || usage
    OUT="$(mkdir -p "$1" && cd "$1" && pwd)"; shift
    TMP="$(mktemp -d "${TMPDIR:-/tmp}/nnunet_plugins_device_check.XXXXXX")"
    trap 'rm -rf "$TMP"' EXIT
    if [ "${DEVICE_CHECK_USE_INSTALLED:-0}" = "1" ]; then
      export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
    else
      # no network: every wheel comes from the folder (checked against its manifest first)
      PYTHONPATH="$ROOT" "$PYTHON" -m nnunet_plugins.device_check verify "$WHEELS" > "$TMP/wheels.txt"
      mapfile -t wheel_files < "$TMP/wheels.txt"
      "$PYTHON" -m pip install --quiet --no-index --no-deps --no-compile --no-cache-dir --target "$TMP/site" \
          "${wheel_files[@]}"
      export PYTHONPATH="$TMP/site"
      export PATH="$TMP/site/bin:$PATH"
      # --target skips .pth files: register our trainers with nnU-Net as the installed .pth would
      export nnUNet_extTrainer="$TMP/site/nnunet_plugins/nnunet_ext_trainers${nnUNet_extTrainer:+:$nnUNet_extTrainer}"
    fi
    # run from the temporary folder, so the installed package (not the checkout) is what gets imported
    cd "$TMP"
    status=0
    "$PYTHON" -m nnunet_plugins.device_check run "$OUT" "$@" || status=$?
    exit $status
    ;;
  *) usage ;;
esac
