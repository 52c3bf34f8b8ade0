#!/usr/bin/env bash
# One-command set-up of cenet-mmdet on a new machine (idempotent).
#
# Creates a virtual environment (default: <repo>/.venv) and installs, in order:
#   torch 2.13.0 (CPU wheel), build tools (setuptools>=77,<82, wheel, ninja),
#   mmengine 0.10.7, mmcv 2.1.0 compiled from source WITH its ops,
#   mmdet 3.3.0, pycocotools, pytest and pytest-xdist 3.8.0 (tools/run_tests.sh
#   runs the suite in parallel processes), onnx/onnxruntime/onnxscript (export
#   tests), and this package in editable mode.
#
# The mmcv build takes about 25 minutes on 2 cores; the built wheel is cached in
# $CENET_CACHE_DIR (default: ~/.cache/cenet-mmdet) and reused when torch, python
# and mmcv versions match, so a second run takes seconds.
#
# Two routes (docs/gpu.md):
#   cpu   (the default, and what CI runs) where no NVIDIA GPU and CUDA compiler
#         are found: the above.
#   cuda  where `nvidia-smi` answers (an NVIDIA driver and a GPU) and `nvcc` is
#         found (PATH, then $CUDA_HOME/bin, $CUDA_PATH/bin, /usr/local/cuda/bin
#         (CENET_CUDA_DEFAULT_HOME)): torch 2.13.0
#         built for the CUDA variant that matches the driver and nvcc (from
#         https://download.pytorch.org/whl/<variant>), and mmcv compiled with its
#         CUDA ops (FORCE_CUDA=1, TORCH_CUDA_ARCH_LIST = the GPUs' compute
#         capabilities, MAX_JOBS = cores), cached under a key that also names
#         nvcc's CUDA version and the architectures.
#   CENET_CUDA=0 forces the cpu route, CENET_CUDA=1 insists on the cuda route
#   (an error where it cannot be taken); CENET_TORCH_CUDA=cu128 picks the torch
#   variant, CENET_TORCH_CUDA_VARIANTS the candidates (newest first),
#   CENET_TORCH_INDEX_URL the index; TORCH_CUDA_ARCH_LIST is kept if set.
#
# --dry-run (or CENET_SETUP_DRY_RUN=1) prints the route chosen and the commands
# it would run, and runs none of them (no venv, no pip, no build).
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
XDIST_VERSION=3.8.0
ONNX_VERSION=1.23.2
ONNXRUNTIME_VERSION=1.31.1
ONNXSCRIPT_VERSION=0.7.2
export MAX_JOBS="${MAX_JOBS:-$(nproc)}"
DRY_RUN="${CENET_SETUP_DRY_RUN:-0}"
for arg in "$@"; do
  case "$arg" in
    --dry-run) DRY_RUN=1 ;;
    *) echo "[setup] unknown argument '$arg' (known: --dry-run)" >&2; exit 2 ;;
  esac
done

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
pip_install() {
  if [ "$DRY_RUN" = "1" ]; then
    echo "[dry-run] $VENV/bin/python -m pip install --disable-pip-version-check $*"
    return 0
  fi
  quiet_pip install --disable-pip-version-check "$@"
}
# a check of what was installed: not run in a dry run (nothing was installed)
verify() { if [ "$DRY_RUN" = "1" ]; then return 0; fi; "$@"; }

# ------------------------------------------------------------ the route
# CUDA is taken where nvidia-smi lists a GPU and nvcc is found. Sets ROUTE
# (cpu|cuda), ROUTE_WHY and, for cuda: GPUS, DRIVER_VERSION, DRIVER_CUDA,
# NVCC, NVCC_CUDA, CUDA_HOME_FOUND, ARCH_LIST, TORCH_VARIANT.
version_le() {  # A <= B for MAJOR.MINOR versions
  [ "$(printf '%s\n%s\n' "$1" "$2" | sort -t. -k1,1n -k2,2n | head -n 1)" = "$1" ]
}
variant_version() {  # cu126 -> 12.6, cu130 -> 13.0
  local digits="${1#cu}"
  echo "${digits%?}.${digits: -1}"
}
pick_torch_variant() {  # newest candidate <= driver and <= nvcc with nvcc's major;
  # else the closest above nvcc with its major that the driver runs (torch
  # builds the extension with a minor-version mismatch, with a warning)
  local candidate version major="${NVCC_CUDA%%.*}" fallback=""
  for candidate in $CENET_TORCH_CUDA_VARIANTS; do
    version="$(variant_version "$candidate")"
    [ "${version%%.*}" = "$major" ] || continue
    version_le "$version" "$DRIVER_CUDA" || continue
    if version_le "$version" "$NVCC_CUDA"; then
      echo "$candidate"
      return 0
    fi
    fallback="$candidate"
  done
  [ -n "$fallback" ] && echo "$fallback"
}
find_nvcc() {
  if command -v nvcc >/dev/null 2>&1; then command -v nvcc; return 0; fi
  local candidate
  for candidate in "${CUDA_HOME:-}" "${CUDA_PATH:-}" "${CENET_CUDA_DEFAULT_HOME-/usr/local/cuda}"; do
    if [ -n "$candidate" ] && [ -x "$candidate/bin/nvcc" ]; then
      echo "$candidate/bin/nvcc"
      return 0
    fi
  done
  return 1
}
CENET_CUDA="${CENET_CUDA:-auto}"
CENET_TORCH_CUDA_VARIANTS="${CENET_TORCH_CUDA_VARIANTS:-cu130 cu129 cu128 cu126 cu124 cu121 cu118}"
detect_route() {
  ROUTE=cpu
  if [ "$CENET_CUDA" = "0" ]; then ROUTE_WHY="CENET_CUDA=0"; return 0; fi
  local query caps
  if ! command -v nvidia-smi >/dev/null 2>&1; then
    ROUTE_WHY="no NVIDIA driver (nvidia-smi not found)"; return 0
  fi
  if ! query="$(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>/dev/null)" \
      || [ -z "$query" ]; then
    ROUTE_WHY="nvidia-smi lists no GPU (is the driver loaded?)"; return 0
  fi
  GPUS="$(cut -d, -f1 <<<"$query" | sed 's/^ *//; s/ *$//' | sort | uniq -c | awk '{n=$1; $1=""; printf "%s%s x%s", (NR>1?", ":""), substr($0,2), n}' || true)"
  DRIVER_VERSION="$(head -n 1 <<<"$query" | cut -d, -f2 | tr -d ' ' || true)"
  DRIVER_CUDA="$(nvidia-smi 2>/dev/null | grep -oE 'CUDA Version: *[0-9]+\.[0-9]+' | grep -oE '[0-9]+\.[0-9]+' | head -n 1 || true)"
  caps="$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null || true)"
  ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-$(tr -d ' ' <<<"$caps" | grep -E '^[0-9]+\.[0-9]+$' | sort -t. -k1,1n -k2,2n -u | paste -sd';' || true)}"
  if [ -z "$ARCH_LIST" ]; then
    ROUTE_WHY="$GPUS, but nvidia-smi does not report their compute capability: set TORCH_CUDA_ARCH_LIST (e.g. 8.0;9.0)"
    return 0
  fi
  if ! NVCC="$(find_nvcc)"; then
    ROUTE_WHY="NVIDIA driver $DRIVER_VERSION ($GPUS) but no nvcc (the CUDA toolkit: PATH, \$CUDA_HOME/bin or /usr/local/cuda/bin), which mmcv's CUDA ops need"
    return 0
  fi
  NVCC_CUDA="$("$NVCC" --version 2>/dev/null | grep -oE 'release [0-9]+\.[0-9]+' | grep -oE '[0-9]+\.[0-9]+' | head -n 1 || true)"
  CUDA_HOME_FOUND="$(cd "$(dirname "$NVCC")/.." && pwd)"
  if [ -z "$DRIVER_CUDA" ] || [ -z "$NVCC_CUDA" ]; then
    ROUTE_WHY="cannot read the CUDA version of the driver ('$DRIVER_CUDA', nvidia-smi) or of nvcc ('$NVCC_CUDA', $NVCC --version)"
    return 0
  fi
  TORCH_VARIANT="${CENET_TORCH_CUDA:-$(pick_torch_variant || true)}"
  if [ -z "$TORCH_VARIANT" ]; then
    ROUTE_WHY="no torch CUDA variant among '$CENET_TORCH_CUDA_VARIANTS' has nvcc's major version ${NVCC_CUDA%%.*} and runs on the driver's CUDA $DRIVER_CUDA (set CENET_TORCH_CUDA=cuXYZ)"
    return 0
  fi
  ROUTE=cuda
  ROUTE_WHY="$GPUS, driver $DRIVER_VERSION (CUDA $DRIVER_CUDA), nvcc $NVCC_CUDA at $NVCC"
}

step "check python ($PYTHON)"
hint "install Python 3.11 (e.g. via pyenv) or set PYTHON=/path/to/python3.11"
command -v "$PYTHON" >/dev/null
"$PYTHON" -c 'import sys; assert sys.version_info[:2] == (3, 11), sys.version' 

STEP="choose the route (cpu or cuda)"
detect_route
if [ "$ROUTE" = "cuda" ]; then
  TORCH_INDEX_URL="${CENET_TORCH_INDEX_URL:-https://download.pytorch.org/whl/$TORCH_VARIANT}"
  echo "[setup] route: cuda ($ROUTE_WHY); torch $TORCH_VERSION+$TORCH_VARIANT from $TORCH_INDEX_URL; mmcv CUDA ops for TORCH_CUDA_ARCH_LIST=$ARCH_LIST"
else
  echo "[setup] route: cpu ($ROUTE_WHY)"
  hint "CENET_CUDA=1 asks for the cuda route, which needs an NVIDIA driver (nvidia-smi), a GPU and nvcc: $ROUTE_WHY"
  [ "$CENET_CUDA" != "1" ]
fi
if [ "$DRY_RUN" = "1" ]; then
  echo "[setup] dry run: the commands below are printed, not run"
fi

step "virtual environment at $VENV"
hint "remove $VENV and re-run; check that the venv module is installed (apt-get install python3-venv)"
if [ ! -x "$VENV/bin/python" ]; then
  if [ "$DRY_RUN" = "1" ]; then
    echo "[dry-run] $PYTHON -m venv $VENV"
  else
    "$PYTHON" -m venv "$VENV"
  fi
fi
PY="$VENV/bin/python"

step "torch $TORCH_VERSION and build tools"
if [ "$ROUTE" = "cuda" ]; then
  hint "pip could not install torch==$TORCH_VERSION+$TORCH_VARIANT from $TORCH_INDEX_URL: pick a CUDA variant published for torch $TORCH_VERSION with CENET_TORCH_CUDA=cuXYZ (same major version as nvcc $NVCC_CUDA), or another index with CENET_TORCH_INDEX_URL; CENET_CUDA=0 takes the cpu route"
  if ! "$PY" -c "import torch, sys; sys.exit(torch.__version__ != '$TORCH_VERSION+$TORCH_VARIANT')" 2>/dev/null; then
    pip_install "torch==$TORCH_VERSION+$TORCH_VARIANT" --index-url "$TORCH_INDEX_URL"
  fi
else
  hint "pip could not install torch==$TORCH_VERSION: the CPU wheel is expected in pip's find-links (see 'pip config list')"
  if ! "$PY" -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '$TORCH_VERSION')" 2>/dev/null; then
    pip_install "torch==$TORCH_VERSION"
  fi
fi
if ! "$PY" -c "import setuptools, wheel, ninja, numpy, sys; v = tuple(int(p) for p in setuptools.__version__.split('.')[:2]); sys.exit(not (77, 0) <= v < (82, 0))" 2>/dev/null; then
  pip_install "setuptools>=77,<82" wheel ninja numpy
fi
verify "$PY" -c "import torch, setuptools, numpy; assert torch.__version__.startswith('$TORCH_VERSION'), torch.__version__"
if [ "$ROUTE" = "cuda" ]; then
  hint "torch $TORCH_VERSION+$TORCH_VARIANT does not see the GPU: check the driver (nvidia-smi) and that $TORCH_VARIANT runs on CUDA $DRIVER_CUDA"
  verify "$PY" -c "import torch; assert torch.version.cuda and torch.cuda.is_available(), (torch.version.cuda, 'no CUDA device'); print('  torch', torch.__version__, 'CUDA', torch.version.cuda, '|', torch.cuda.get_device_name(0))"
fi

step "mmengine $MMENGINE_VERSION, pycocotools, pytest, pytest-xdist $XDIST_VERSION"
hint "pip could not install mmengine/pycocotools/pytest/pytest-xdist from the package registry"
if ! "$PY" -c "import mmengine, pycocotools, pytest, xdist, sys; sys.exit(mmengine.__version__ != '$MMENGINE_VERSION' or xdist.__version__ != '$XDIST_VERSION')" 2>/dev/null; then
  pip_install "mmengine==$MMENGINE_VERSION" pycocotools pytest "pytest-xdist==$XDIST_VERSION"
fi
verify "$PY" -c "import mmengine, pycocotools, pytest, xdist; assert mmengine.__version__ == '$MMENGINE_VERSION'; assert xdist.__version__ == '$XDIST_VERSION', xdist.__version__"

mmcv_ok() {
  "$PY" - <<PYEOF 2>/dev/null
import mmcv, sys
from mmcv.ops import RoIAlign, nms  # needs the compiled extension
if '$ROUTE' == 'cuda':  # and its CUDA part, for the GPU in use
    import torch
    from mmcv.ops import get_compiling_cuda_version
    assert get_compiling_cuda_version() != 'not available'
    boxes = torch.tensor([[0., 0., 4., 4.], [0., 0., 4., 5.]], device='cuda')
    nms(boxes, torch.tensor([0.9, 0.8], device='cuda'), 0.5)
sys.exit(mmcv.__version__ != '$MMCV_VERSION')
PYEOF
}

step "mmcv $MMCV_VERSION with compiled ops"
if [ "$DRY_RUN" != "1" ]; then
  TORCH_TAG=$("$PY" -c "import torch; print(torch.__version__.replace('+', '_'))")
  PY_TAG=$("$PY" -c "import sys; print(f'cp{sys.version_info[0]}{sys.version_info[1]}')")
else  # what the install above would give
  if [ "$ROUTE" = "cuda" ]; then
    TORCH_TAG="${TORCH_VERSION}_$TORCH_VARIANT"
  elif ! TORCH_TAG=$("$PY" -c "import torch; print(torch.__version__.replace('+', '_'))" 2>/dev/null); then
    TORCH_TAG="<torch.__version__ after the install>"
  fi
  PY_TAG=$("$PYTHON" -c "import sys; print(f'cp{sys.version_info[0]}{sys.version_info[1]}')")
fi
WHEEL_DIR="$CACHE_DIR/wheels/mmcv-$MMCV_VERSION-torch$TORCH_TAG-$PY_TAG-$(uname -m)"
if [ "$ROUTE" = "cuda" ]; then
  # a wheel holds machine code for the architectures it was built for, by that nvcc
  WHEEL_DIR="$WHEEL_DIR-nvcc$NVCC_CUDA-sm$(tr -d '.' <<<"$ARCH_LIST" | tr ';' '_')"
fi
if { [ "$DRY_RUN" != "1" ] || [ -x "$PY" ]; } && mmcv_ok; then
  echo "  mmcv $MMCV_VERSION with ops already installed"
else
  if ! ls "$WHEEL_DIR"/mmcv-*.whl >/dev/null 2>&1; then
    hint "the mmcv build failed: check the compiler (gcc/g++), free disk space, and that setuptools>=77,<82 and torch are installed in $VENV; the full log is in $CACHE_DIR/mmcv-build.log"
    if [ "$ROUTE" = "cuda" ]; then
      hint "the mmcv build with CUDA ops failed: check nvcc ($NVCC, CUDA $NVCC_CUDA) against torch's CUDA ($TORCH_VARIANT), the host compiler nvcc accepts, free disk space; the full log is in $CACHE_DIR/mmcv-build.log"
      BUILD_ENV=(MMCV_WITH_OPS=1 FORCE_CUDA=1 "CUDA_HOME=$CUDA_HOME_FOUND" "TORCH_CUDA_ARCH_LIST=$ARCH_LIST" "MAX_JOBS=$MAX_JOBS")
    else
      BUILD_ENV=(MMCV_WITH_OPS=1 FORCE_CUDA=0)
    fi
    if [ "$DRY_RUN" = "1" ]; then
      echo "[dry-run] ${BUILD_ENV[*]} $PY -m pip wheel -v --no-build-isolation --no-deps mmcv==$MMCV_VERSION -w <temporary folder> > $CACHE_DIR/mmcv-build.log"
      echo "[dry-run] cache the wheel in $WHEEL_DIR"
    else
      mkdir -p "$CACHE_DIR"
      BUILD_DIR=$(mktemp -d "$CACHE_DIR/build.XXXXXX")
      if [ "$ROUTE" = "cuda" ]; then
        echo "  building mmcv $MMCV_VERSION from source with CPU and CUDA ops (TORCH_CUDA_ARCH_LIST=$ARCH_LIST, MAX_JOBS=$MAX_JOBS)"
      else
        echo "  building mmcv $MMCV_VERSION from source with ops (about 25 min on 2 cores, MAX_JOBS=$MAX_JOBS)"
      fi
      echo "  log: $CACHE_DIR/mmcv-build.log; cache: $WHEEL_DIR"
      BUILD_T0=$(date +%s)
      # Progress: the latest ninja [done/total] counter every 30 s.
      env "${BUILD_ENV[@]}" "$PY" -m pip wheel -v --no-build-isolation --no-deps \
          "mmcv==$MMCV_VERSION" -w "$BUILD_DIR" > "$CACHE_DIR/mmcv-build.log" 2>&1 &
      BUILD_PID=$!
      while kill -0 "$BUILD_PID" 2>/dev/null; do
        sleep 30
        progress=$(grep -o -E '^\s*\[[0-9]+/[0-9]+\]' "$CACHE_DIR/mmcv-build.log" | tail -n 1 | tr -d ' ' || true)
        echo "  [mmcv build +$(( $(date +%s) - T0 ))s] compiled ${progress:-[starting]} sources"
      done
      wait "$BUILD_PID"
      echo "  mmcv build took $(( $(date +%s) - BUILD_T0 ))s (route $ROUTE, MAX_JOBS=$MAX_JOBS)"
      ls "$BUILD_DIR"/mmcv-*.whl >/dev/null
      mkdir -p "$WHEEL_DIR"
      mv "$BUILD_DIR"/mmcv-*.whl "$WHEEL_DIR"/
      rm -rf "$BUILD_DIR"
    fi
  else
    echo "  using cached wheel $(ls "$WHEEL_DIR"/mmcv-*.whl)"
  fi
  hint "installing the cached mmcv wheel failed; delete $WHEEL_DIR to force a rebuild"
  REINSTALL=()  # cuda: replaces an mmcv of the same version without CUDA ops
  if [ "$ROUTE" = "cuda" ]; then REINSTALL=(--force-reinstall --no-deps); fi
  if [ "$DRY_RUN" = "1" ]; then
    pip_install "${REINSTALL[@]}" "$WHEEL_DIR/mmcv-$MMCV_VERSION-*.whl"
  else
    pip_install "${REINSTALL[@]}" "$(ls "$WHEEL_DIR"/mmcv-*.whl | head -n 1)"
  fi
  verify mmcv_ok
fi

step "mmdet $MMDET_VERSION"
hint "pip could not install mmdet==$MMDET_VERSION or its requirements"
if ! "$PY" -c "import mmdet, sys; sys.exit(mmdet.__version__ != '$MMDET_VERSION')" 2>/dev/null; then
  pip_install "mmdet==$MMDET_VERSION"
fi
verify "$PY" -c "import mmdet; assert mmdet.__version__ == '$MMDET_VERSION'"

step "onnx $ONNX_VERSION, onnxruntime $ONNXRUNTIME_VERSION, onnxscript $ONNXSCRIPT_VERSION (ONNX export tests)"
hint "pip could not install onnx/onnxruntime/onnxscript from the package registry"
if ! "$PY" -c "import onnx, onnxruntime, onnxscript, sys; sys.exit((onnx.__version__, onnxruntime.__version__, onnxscript.__version__) != ('$ONNX_VERSION', '$ONNXRUNTIME_VERSION', '$ONNXSCRIPT_VERSION'))" 2>/dev/null; then
  pip_install "onnx==$ONNX_VERSION" "onnxruntime==$ONNXRUNTIME_VERSION" "onnxscript==$ONNXSCRIPT_VERSION"
fi
verify "$PY" -c "import onnx, onnxruntime, onnxscript"

step "cenet-mmdet (editable)"
hint "'pip install -e .' failed: see the error above"
if ! (cd / && "$PY" -c "import cenet_mmdet.version as v, os, sys; sys.exit(os.path.dirname(os.path.dirname(os.path.abspath(v.__file__))) != '$ROOT')") 2>/dev/null; then
  pip_install --no-deps --no-build-isolation -e "$ROOT"
fi
verify "$PY" -c "import cenet_mmdet; print('  cenet_mmdet', cenet_mmdet.__version__, 'imported; torch', __import__('torch').__version__, '| mmcv', __import__('mmcv').__version__, '| mmdet', __import__('mmdet').__version__)"
if [ "$ROUTE" = "cuda" ]; then
  verify "$PY" -c "import torch; from mmcv.ops import get_compiling_cuda_version as v; print('  CUDA:', torch.cuda.get_device_name(0), '| torch CUDA', torch.version.cuda, '| mmcv ops compiled with CUDA', v())"
fi

if [ "$DRY_RUN" = "1" ]; then
  step "dry run done ($ROUTE route): nothing was installed or built"
  exit 0
fi
step "done in $(( $(date +%s) - T0 ))s; activate with: source $VENV/bin/activate"
