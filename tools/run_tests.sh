#!/usr/bin/env bash
# Runs the test suite in the environment made by tools/setup_env.sh.
# Extra arguments go to pytest (e.g. `bash tools/run_tests.sh tests/test_layers -x`).
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${CENET_VENV:-$ROOT/.venv}"
if [ ! -x "$VENV/bin/python" ]; then
  echo "[tests] no environment at $VENV: run 'bash tools/setup_env.sh' first" >&2
  exit 1
fi
cd "$ROOT"
"$VENV/bin/python" -m pytest -q -p no:cacheprovider "${@:-tests}"
rc=$?
if [ "$rc" -eq 5 ]; then
  echo "[tests] pytest collected no tests: treated as a failure" >&2
  exit 1
fi
exit "$rc"
