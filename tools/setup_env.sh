#!/usr/bin/env bash
# One-command set-up of cenet-mmdet on a new machine (idempotent).
#
# Creates a virtual environment (default: <repo>/.venv) and installs, in order:
#   torch 2.13.0 (CPU wheel), build tools (setuptools>=77,<82, wheel, ninja),
#   mmengine 0.10.7, mmcv 2.1.0 compiled from source WITH its ops,
#   mmdet 3.3.0, pycocotools, pytest, onnx/onnxruntime/onnxscript (export
#   tests), and this package in editable mode.
#
# The mmcv build takes about 25 minutes on 2 cores; the built wheel is cached in
# $CENET_CACHE_DIR (default: ~/.cache/cenet-mmdet) and reused when torch, python
# and mmcv versions match, so a second run takes seconds.
#
# Environment overrides: CENET_VENV, CENET_CACHE_DIR, PYTHON, MAX_JOBS.
set -Eeuo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${CENET_VENV:-$ROOT/.venv}"
CACHE_DIR="${CENET_CACHE_DIR:-$HOME/.cache/cenet-mmdet}"
PYTHON="${PYTHON:-python3.11}"
TORCH_VERSION=2.13.0
MMENGINE_VERSION=0.10.7
MMCV_VERSION=2.1.0
MMDET_VERSION=3.3.0
ONNX_VERSION=1.23.2
ONNXRUNTIME_VERSION=1.31.1
ONNXSCRIPT_VERSION=0.7.2
export MAX_JOBS="${MAX_JOBS:-$(nproc)}"

STEP="start"
T0=$(date +%s)
step() { STEP="$1"; echo "[setup +$(( $(date +%s) - T0 ))s] $1"; }
hint() { HINT="$1"; }
HINT="re-run 'bash tools/setup_env.sh' and read the error above"
on_error() {
  echo "" >&2
  echo "[setup] FAILED during: $STEP" >&2
  echo "[setup] what to do: $HINT" >&2
  exit 1
}
trap on_error ERR

# pip on some machines prints one warning per missing local index entry; keep the log readable.
quiet_pip() {
  "$VENV/bin/python" -m pip "$@" 2>&1 | { grep -v -e "is ignored: it is neither a file nor a directory" || true; }
  return "${PIPESTATUS[0]}"
}
pip_install() { quiet_pip install --disable-pip-version-check "$@"; }

step "check python ($PYTHON)"
hint "install Python 3.11 (e.g. via pyenv) or set PYTHON=/path/to/python3.11"
command -v "$PYTHON" >/dev/null
"$PYTHON" -c 'import sys; assert sys.version_info[:2] == (3, 11), sys.version' 

step "virtual environment at $VENV"
hint "remove $VENV and re-run; check that the venv module is installed (apt-get install python3-venv)"
if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
fi
PY="$VENV/bin/python"

step "torch $TORCH_VERSION and build tools"
hint "pip could not install torch==$TORCH_VERSION: the CPU wheel is expected in pip's find-links (see 'pip config list')"
if ! "$PY" -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '$TORCH_VERSION')" 2>/dev/null; then
  pip_install "torch==$TORCH_VERSION"
fi
if ! "$PY" -c "import setuptools, wheel, ninja, numpy, sys; v = tuple(int(p) for p in setuptools.__version__.split('.')[:2]); sys.exit(not (77, 0) <= v < (82, 0))" 2>/dev/null; then
  pip_install "setuptools>=77,<82" wheel ninja numpy
fi
"$PY" -c "import torch, setuptools, numpy; assert torch.__version__.startswith('$TORCH_VERSION'), torch.__version__"

step "mmengine $MMENGINE_VERSION, pycocotools, pytest"
hint "pip could not install mmengine/pycocotools/pytest from the package registry"
if ! "$PY" -c "import mmengine, pycocotools, pytest, sys; sys.exit(mmengine.__version__ != '$MMENGINE_VERSION')" 2>/dev/null; then
  pip_install "mmengine==$MMENGINE_VERSION" pycocotools pytest
fi
"$PY" -c "import mmengine, pycocotools, pytest; assert mmengine.__version__ == '$MMENGINE_VERSION'"

mmcv_ok() {
  "$PY" - <<PYEOF 2>/dev/null
import mmcv, sys
from mmcv.ops import RoIAlign, nms  # needs the compiled extension
sys.exit(mmcv.__version__ != '$MMCV_VERSION')
PYEOF
}

step "mmcv $MMCV_VERSION with compiled ops"
TORCH_TAG=$("$PY" -c "import torch; print(torch.__version__.replace('+', '_'))")
PY_TAG=$("$PY" -c "import sys; print(f'cp{sys.version_info[0]}{sys.version_info[1]}')")
WHEEL_DIR="$CACHE_DIR/wheels/mmcv-$MMCV_VERSION-torch$TORCH_TAG-$PY_TAG-$(uname -m)"
if mmcv_ok; then
  echo "  mmcv $MMCV_VERSION with ops already installed"
else
  if ! ls "$WHEEL_DIR"/mmcv-*.whl >/dev/null 2>&1; then
    hint "the mmcv build failed: check the compiler (gcc/g++), free disk space, and that setuptools>=77,<82 and torch are installed in $VENV; the full log is in $CACHE_DIR/mmcv-build.log"
    mkdir -p "$CACHE_DIR"
    BUILD_DIR=$(mktemp -d "$CACHE_DIR/build.XXXXXX")
    echo "  building mmcv $MMCV_VERSION from source with ops (about 25 min on 2 cores, MAX_JOBS=$MAX_JOBS)"
    echo "  log: $CACHE_DIR/mmcv-build.log; cache: $WHEEL_DIR"
    # Progress: the latest ninja [done/total] counter every 30 s.
    MMCV_WITH_OPS=1 FORCE_CUDA=0 "$PY" -m pip wheel -v --no-build-isolation --no-deps \
        "mmcv==$MMCV_VERSION" -w "$BUILD_DIR" > "$CACHE_DIR/mmcv-build.log" 2>&1 &
    BUILD_PID=$!
    while kill -0 "$BUILD_PID" 2>/dev/null; do
      sleep 30
      progress=$(grep -o -E '^\s*\[[0-9]+/[0-9]+\]' "$CACHE_DIR/mmcv-build.log" | tail -n 1 | tr -d ' ' || true)
      echo "  [mmcv build +$(( $(date +%s) - T0 ))s] compiled ${progress:-[starting]} sources"
    done
    wait "$BUILD_PID"
    ls "$BUILD_DIR"/mmcv-*.whl >/dev/null
    mkdir -p "$WHEEL_DIR"
    mv "$BUILD_DIR"/mmcv-*.whl "$WHEEL_DIR"/
    rm -rf "$BUILD_DIR"
  else
    echo "  using cached wheel $(ls "$WHEEL_DIR"/mmcv-*.whl)"
  fi
  hint "installing the cached mmcv wheel failed; delete $WHEEL_DIR to force a rebuild"
  pip_install "$(ls "$WHEEL_DIR"/mmcv-*.whl | head -n 1)"
  mmcv_ok
fi

step "mmdet $MMDET_VERSION"
hint "pip could not install mmdet==$MMDET_VERSION or its requirements"
if ! "$PY" -c "import mmdet, sys; sys.exit(mmdet.__version__ != '$MMDET_VERSION')" 2>/dev/null; then
  pip_install "mmdet==$MMDET_VERSION"
fi
"$PY" -c "import mmdet; assert mmdet.__version__ == '$MMDET_VERSION'"

step "onnx $ONNX_VERSION, onnxruntime $ONNXRUNTIME_VERSION, onnxscript $ONNXSCRIPT_VERSION (ONNX export tests)"
hint "pip could not install onnx/onnxruntime/onnxscript from the package registry"
if ! "$PY" -c "import onnx, onnxruntime, onnxscript, sys; sys.exit((onnx.__version__, onnxruntime.__version__, onnxscript.__version__) != ('$ONNX_VERSION', '$ONNXRUNTIME_VERSION', '$ONNXSCRIPT_VERSION'))" 2>/dev/null; then
  pip_install "onnx==$ONNX_VERSION" "onnxruntime==$ONNXRUNTIME_VERSION" "onnxscript==$ONNXSCRIPT_VERSION"
fi
"$PY" -c "import onnx, onnxruntime, onnxscript"

step "cenet-mmdet (editable)"
hint "'pip install -e .' failed: see the error above"
if ! (cd / && "$PY" -c "import cenet_mmdet.version as v, os, sys; sys.exit(os.path.dirname(os.path.dirname(os.path.abspath(v.__file__))) != '$ROOT')") 2>/dev/null; then
  pip_install --no-deps --no-build-isolation -e "$ROOT"
fi
"$PY" -c "import cenet_mmdet; print('  cenet_mmdet', cenet_mmdet.__version__, 'imported; torch', __import__('torch').__version__, '| mmcv', __import__('mmcv').__version__, '| mmdet', __import__('mmdet').__version__)"

step "done in $(( $(date +%s) - T0 ))s; activate with: source $VENV/bin/activate"
