#!/usr/bin/env bash
# Set up .venv and run the whole test suite (unit tests and the slow end-to-end tests) against the
# installed package. Extra arguments go to pytest (e.g. -m "not slow" for the fast tests only).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
source "$ROOT/scripts/setup_env.sh"
cd "$ROOT"
# the tests import the INSTALLED package (pytest's console script does not put the checkout on sys.path)
exec "$VENV/bin/pytest" -p no:cacheprovider "$@"
