#!/usr/bin/env bash
# Runs the test suite in the environment made by tools/setup_env.sh.
# Extra arguments go to pytest (e.g. `bash tools/run_tests.sh tests/test_layers -x`).
#
# The tests run in parallel processes (pytest-xdist, installed by
# tools/setup_env.sh): CENET_TEST_WORKERS of them (default: the number of
# cores, at most 4); each test file runs whole in one process (--dist
# loadfile; files that share a session fixture together, tests/conftest.py),
# so its fixtures run once, and the slowest files start first
# (tests/conftest.py: SLOW_FIRST).
# CENET_TEST_WORKERS=0 runs them in this one process, in file order.
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${CENET_VENV:-$ROOT/.venv}"
if [ ! -x "$VENV/bin/python" ]; then
  echo "[tests] no environment at $VENV: run 'bash tools/setup_env.sh' first" >&2
  exit 1
fi
cd "$ROOT"
CORES="$(nproc 2>/dev/null || echo 1)"
WORKERS="${CENET_TEST_WORKERS:-$(( CORES < 4 ? CORES : 4 ))}"
if ! [[ "$WORKERS" =~ ^[0-9]+$ ]]; then
  echo "[tests] CENET_TEST_WORKERS must be a whole number, got '$WORKERS'" >&2
  exit 2
fi
PARALLEL=()
if [ "$WORKERS" -ge 2 ]; then
  if "$VENV/bin/python" -c "import xdist" 2>/dev/null; then
    PARALLEL=(-n "$WORKERS" --dist loadfile --no-loadscope-reorder)
  else
    echo "[tests] pytest-xdist is not installed (re-run 'bash tools/setup_env.sh'): one process" >&2
  fi
fi
"$VENV/bin/python" -m pytest -q -p no:cacheprovider "${PARALLEL[@]}" "${@:-tests}"
rc=$?
if [ "$rc" -eq 5 ]; then
  echo "[tests] pytest collected no tests: treated as a failure" >&2
  exit 1
fi
exit "$rc"
