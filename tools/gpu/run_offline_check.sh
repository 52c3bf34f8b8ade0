#!/usr/bin/env bash
# The offline GPU check, one command on a GPU node without internet, inside a
# kit made by tools/gpu/prepare_offline.sh (docs/dev/gpu-offline-kit.md):
#
#   CENET_GPU_CHECK_OUT=/some/folder bash run_offline_check.sh
#
# Within CENET_GPU_CHECK_BUDGET_S (600 s) of wall time in all, it
#  1. checks the node: the kit's Python version, a torch that imports and sees
#     a GPU (else it stops with status 2, nothing installed);
#  2. makes a temporary virtual environment that sees the node's packages
#     (a .pth file adds the node Python's site directories after its own) and
#     installs the kit's wheels into it only (--no-index --no-deps
#     --ignore-installed): the node's torch is never touched, and is checked
#     to be the one imported; then checks that what the kit assumed on the
#     node is there (check_env.py --requirements), else status 3;
#  3. builds mmcv from the kit's sdist against the node's torch, MAX_JOBS =
#     cores: CPU ops, plus CUDA ops (FORCE_CUDA=1, TORCH_CUDA_ARCH_LIST = the
#     GPUs' capabilities) where nvcc is found and the estimated build leaves
#     time for the check (CENET_MMCV_CUDA=auto, the default; 1 builds them
#     whatever the estimate, 0 never). A failed or late CUDA build falls back
#     to CPU ops when time remains; a failed build ends with status 4;
#  4. installs the plugin from the kit's source snapshot (or CENET_KIT_SOURCE,
#     a checkout) in editable mode, records check_env.py's report;
#  5. runs tools/gpu/gpu_check.sh in the time left; without mmcv CUDA
#     ops its RoI steps (bench_detector, synthetic_data, train_amp) are SKIP
#     with the reason, the others run on CUDA tensors;
#  6. writes to CENET_GPU_CHECK_OUT (default <kit>/gpu_check_out) at most
#     four files: summary.md (the phases with their seconds, the mmcv build
#     time, mode and estimate, then gpu_check's table), offline_check.log
#     (this console), logs.tar.gz (pip, mmcv build, check_env and every
#     gpu_check step log) and build_time.txt.
# Exit status: gpu_check's (0 every step that ran passed, 1 a step failed, 2
# it refused), or 2 the node is not fit (nothing installed), 3 the install
# or the node's assumed packages failed, 4 the mmcv build failed.
#
# Environment: CENET_NODE_PYTHON (python3: the Python that has the node's
# torch), CENET_GPU_CHECK_OUT, CENET_GPU_CHECK_BUDGET_S (600), CENET_MMCV_CUDA
# (auto|1|0), MAX_JOBS (cores), CENET_GPU_CHECK_WORK (a folder kept for the
# next run, whose mmcv wheel is then reused; default a temporary one, removed
# unless CENET_KEEP_WORK=1), CENET_KIT_SOURCE, CENET_GPU_CHECK_WITHOUT_CUDA=1
# (on a machine without a GPU: install and build anyway, to test the kit;
# gpu_check then refuses with status 2), and the build-time model below.
set -uo pipefail

KIT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
OUT="${CENET_GPU_CHECK_OUT:-$KIT/gpu_check_out}"
NODE_PY="${CENET_NODE_PYTHON:-python3}"
BUDGET_S="${CENET_GPU_CHECK_BUDGET_S:-600}"
MMCV_CUDA="${CENET_MMCV_CUDA:-auto}"
JOBS="${MAX_JOBS:-$(nproc)}"
WITHOUT_CUDA="${CENET_GPU_CHECK_WITHOUT_CUDA:-0}"
WORK_GIVEN="${CENET_GPU_CHECK_WORK:-}"
WORK=""
SOURCE="${CENET_KIT_SOURCE:-}"
# Build-time model (docs/dev/gpu-offline-kit.md), in CPU seconds (user + sys) per source,
# measured on the project's CPU machine (2026-12-02): a C++ source of mmcv
# 2.1.0 ~18 (gcc 12, -O3 -g; 4 sources 14-23; the whole CPU build, 77
# sources, took 665 s on 2 cores), a .cu source ~30 for one architecture
# (nvcc 13.0, sm_90; 4 sources 27-32). The CPU build compiles 77 C++
# sources, the CUDA build 78 C++ and 58 .cu (x the number of architectures).
# On 16 cores of that speed: CPU ops ~100 s, CPU+CUDA ops ~210 s.
CPP_CORE_S="${CENET_EST_CPP_CORE_S:-18}"
CU_CORE_S="${CENET_EST_CU_CORE_S:-30}"
LINK_S="${CENET_EST_LINK_S:-15}"
# what gpu_check needs after the build for the CUDA build to be worth it: its
# layer, AMP, SyncCE, benchmark, Mask R-CNN and compile steps (an estimate:
# never timed on a GPU yet)
CHECK_NEED_S="${CENET_EST_CHECK_S:-420}"
MIN_CHECK_S=90    # gpu_check is not started with less than this left
N_CPP_CPU=77; N_CPP_CUDA=78; N_CU=58

START_S="$(date +%s)"
PHASES=()
declare -A P_RESULT P_SECONDS P_DETAIL
BUILD_MODE="" BUILD_WHY="" BUILD_SECONDS="-" BUILD_SOURCES="" EST_CPU_S=0 EST_CUDA_S=0
ARCH_LIST="" NVCC="" CUDA_POSSIBLE=0 CUDA_WHY=""

say() { echo "[offline_check +$(( $(date +%s) - START_S ))s] $*"; }
elapsed_s() { echo $(( $(date +%s) - START_S )); }
left_s() { echo $(( BUDGET_S - ($(date +%s) - START_S) )); }
refuse() {  # status message: the node is not fit, nothing installed
  echo "[offline_check] $2" >&2
  exit "$1"
}
phase() {  # name result seconds detail
  PHASES+=("$1"); P_RESULT[$1]="$2"; P_SECONDS[$1]="$3"; P_DETAIL[$1]="$4"
  say "$1: $2 in $3 s${4:+ ($4)}"
}

find_nvcc() {
  if command -v nvcc >/dev/null 2>&1; then command -v nvcc; return 0; fi
  local home
  for home in "${CUDA_HOME:-}" "${CUDA_PATH:-}" /usr/local/cuda; do
    if [ -n "$home" ] && [ -x "$home/bin/nvcc" ]; then echo "$home/bin/nvcc"; return 0; fi
  done
  return 1
}

# est_build_s SOURCES_CPP SOURCES_CU: wall seconds on JOBS cores
est_build_s() {
  awk -v a="$1" -v b="$2" -v c="$CPP_CORE_S" -v u="$CU_CORE_S" -v j="$JOBS" -v l="$LINK_S" \
    'BEGIN{ printf "%d", (a * c + b * u) / j + l + 0.5 }'
}

# decide_mmcv_build: BUILD_MODE (cuda|cpu) and BUILD_WHY from CUDA_POSSIBLE,
# CUDA_WHY, ARCH_LIST, MMCV_CUDA, JOBS and the time left
decide_mmcv_build() {
  local arches left
  arches=$(tr ';' '\n' <<<"${ARCH_LIST:-x}" | grep -c .)
  EST_CPU_S=$(est_build_s "$N_CPP_CPU" 0)
  EST_CUDA_S=$(est_build_s "$N_CPP_CUDA" $(( N_CU * arches )))
  left=$(left_s)
  if [ "$MMCV_CUDA" = "0" ]; then
    BUILD_MODE=cpu; BUILD_WHY="CENET_MMCV_CUDA=0"
  elif [ "$CUDA_POSSIBLE" != "1" ]; then
    BUILD_MODE=cpu; BUILD_WHY="$CUDA_WHY"
  elif [ "$MMCV_CUDA" = "1" ]; then
    BUILD_MODE=cuda; BUILD_WHY="CENET_MMCV_CUDA=1"
  elif [ $(( EST_CUDA_S + CHECK_NEED_S )) -le "$left" ]; then
    BUILD_MODE=cuda; BUILD_WHY="estimated ${EST_CUDA_S} s on $JOBS cores + ${CHECK_NEED_S} s of checks fit the ${left} s left"
  else
    BUILD_MODE=cpu
    BUILD_WHY="CUDA ops not built: their estimated build, ${EST_CUDA_S} s on $JOBS cores, + ${CHECK_NEED_S} s of checks do not fit the ${left} s left of the ${BUDGET_S} s budget (CENET_MMCV_CUDA=1 builds them anyway)"
  fi
}

# last_progress LOG: the last ninja [done/total] counter of a build log
last_progress() {
  grep -o -E '^\s*\[[0-9]+/[0-9]+\]' "$1" 2>/dev/null | tail -n 1 | tr -d ' []' || true
}

# build_mmcv MODE LIMIT_S: the wheel in $WORK/dist-MODE (reused if there);
# status 0 built, 1 failed, 124 out of time
build_mmcv() {
  local mode="$1" limit="$2" dist="$WORK/dist-$1" src="$WORK/mmcv-src-$1" log="$LOGS/mmcv_build_$1.log"
  local env=(MMCV_WITH_OPS=1 "MAX_JOBS=$JOBS") t0 pid rc
  if ls "$dist"/mmcv-*.whl >/dev/null 2>&1; then
    say "mmcv ($mode ops): reusing $(ls "$dist"/mmcv-*.whl)"
    BUILD_SOURCES="reused"
    return 0
  fi
  rm -rf "$src" && mkdir -p "$src" "$dist"
  tar -xzf "$KIT/$MMCV_SDIST" -C "$src" --strip-components=1 || return 1
  if [ "$mode" = "cuda" ]; then
    env+=(FORCE_CUDA=1 "TORCH_CUDA_ARCH_LIST=$ARCH_LIST" "CUDA_HOME=$(cd "$(dirname "$NVCC")/.." && pwd)")
  else  # mmcv builds CUDA ops whenever torch sees a GPU: hide it
    env+=(FORCE_CUDA=0 CUDA_VISIBLE_DEVICES=)
  fi
  say "mmcv $MMCV_VERSION: building $mode ops (${env[*]}; limit ${limit} s; log $log)"
  t0=$(date +%s)
  ( cd "$src" && exec env "${env[@]}" timeout --kill-after=10 "$limit" \
      "$VPY" -m pip wheel -v --no-build-isolation --no-deps --no-index . -w "$dist" ) > "$log" 2>&1 &
  pid=$!
  while kill -0 "$pid" 2>/dev/null; do
    sleep 5
    if [ $(( ($(date +%s) - t0) % 30 )) -lt 5 ]; then
      say "  mmcv build ($mode): compiled [$(last_progress "$log")] sources"
    fi
  done
  wait "$pid"; rc=$?
  BUILD_SECONDS=$(( $(date +%s) - t0 ))
  BUILD_SOURCES="$(last_progress "$log")"
  if [ "$rc" -ne 0 ] || ! ls "$dist"/mmcv-*.whl >/dev/null 2>&1; then
    [ "$rc" -eq 0 ] && rc=1
    [ "$rc" -eq 137 ] && rc=124
    say "mmcv build ($mode) failed (status $rc) after ${BUILD_SECONDS} s at [${BUILD_SOURCES}]: tail of $log:"
    tail -n 15 "$log" | sed 's/^/    /'
    return "$rc"
  fi
  return 0
}

write_outputs() {  # final status: summary.md, logs.tar.gz, build_time.txt
  local status="$1" name gpu_summary="$WORK/gpu_check/summary.md"
  {
    echo "# Offline GPU check, $(date -u '+%Y-%m-%d %H:%M UTC')"
    echo
    echo "kit: source ${KIT_COMMIT:-?} (made ${KIT_DATE:-?}), CPython ${KIT_PYTHON:-?}; node: python ${NODE_PY_VERSION:-?}, torch ${TORCH_VERSION:-?} (CUDA ${TORCH_CUDA:-?}), ${GPU_COUNT:-0} GPU(s), $JOBS build jobs ($(nproc) cores)"
    echo
    echo "mmcv build: ${BUILD_MODE:-not started} ops, ${BUILD_SECONDS} s, ${BUILD_SOURCES:-?} sources; estimate on $JOBS cores: CPU ops ${EST_CPU_S} s, CPU+CUDA ops ${EST_CUDA_S} s (${ARCH_LIST:-no} arch); why: ${BUILD_WHY:-?}"
    echo
    echo "total: $(elapsed_s) s of the ${BUDGET_S} s budget; exit status $status"
    echo
    echo "| phase | result | seconds | details |"
    echo "|---|---|---|---|"
    for name in "${PHASES[@]}"; do
      echo "| $name | ${P_RESULT[$name]} | ${P_SECONDS[$name]} | ${P_DETAIL[$name]} |"
    done
    if [ -f "$gpu_summary" ]; then
      echo
      echo "## gpu_check.sh"
      echo
      cat "$gpu_summary"
    fi
  } > "$OUT/summary.md"
  echo "mmcv_build_mode=${BUILD_MODE:-none} mmcv_build_s=${BUILD_SECONDS} sources=${BUILD_SOURCES:-?} jobs=$JOBS est_cpu_s=$EST_CPU_S est_cuda_s=$EST_CUDA_S total_s=$(elapsed_s) status=$status" > "$OUT/build_time.txt"
  if [ -n "${WORK:-}" ] && [ -d "$WORK" ]; then
    mkdir -p "$LOGS/gpu_check"
    cp "$WORK"/gpu_check/*.log "$WORK"/gpu_check/summary.md "$LOGS/gpu_check/" 2>/dev/null
    cp "$OUT/summary.md" "$LOGS/" 2>/dev/null
    tar -C "$WORK" -czf "$OUT/logs.tar.gz" logs 2>/dev/null
  fi
  echo
  cat "$OUT/summary.md"
  echo
  say "results in $OUT (summary.md, offline_check.log, logs.tar.gz, build_time.txt)"
  if [ -z "$WORK_GIVEN" ] && [ "${CENET_KEEP_WORK:-0}" != "1" ] && [ -n "${WORK:-}" ]; then
    rm -rf "$WORK"
  elif [ -n "${WORK:-}" ]; then
    say "work folder kept: $WORK"
  fi
}

finish() { write_outputs "$1"; exit "$1"; }

main() {
  mkdir -p "$OUT" || refuse 2 "cannot create $OUT"
  exec > >(tee "$OUT/offline_check.log") 2>&1
  say "kit $KIT; results to $OUT; budget ${BUDGET_S} s"

  # ---- 1. the node
  [ -f "$KIT/kit.env" ] || refuse 2 "$KIT has no kit.env: not a kit made by tools/gpu/prepare_offline.sh"
  # shellcheck disable=SC1091
  source "$KIT/kit.env"
  command -v "$NODE_PY" >/dev/null 2>&1 || refuse 2 "no Python '$NODE_PY' (set CENET_NODE_PYTHON)"
  NODE_PY_VERSION="$("$NODE_PY" -c 'import sys; print("%d.%d" % sys.version_info[:2])')"
  [ "$NODE_PY_VERSION" = "$KIT_PYTHON" ] || refuse 2 "the kit is for Python $KIT_PYTHON, $NODE_PY is $NODE_PY_VERSION: make the kit with 'bash tools/gpu/prepare_offline.sh --python $NODE_PY_VERSION' (or set CENET_NODE_PYTHON)"
  local probe
  probe="$("$NODE_PY" -c 'import torch; print(torch.__version__, torch.version.cuda, int(torch.cuda.is_available()), torch.cuda.device_count(), torch.__file__)' 2>/dev/null | tail -n 1)"
  [ -n "$probe" ] || refuse 2 "torch does not import with $NODE_PY: the kit uses the node's torch"
  read -r TORCH_VERSION TORCH_CUDA CUDA_AVAILABLE GPU_COUNT TORCH_FILE <<<"$probe"
  if [ "$CUDA_AVAILABLE" != "1" ] && [ "$WITHOUT_CUDA" != "1" ]; then
    refuse 2 "no CUDA device: torch $TORCH_VERSION (CUDA $TORCH_CUDA) sees no GPU; nothing was installed or built (CENET_GPU_CHECK_WITHOUT_CUDA=1 installs and builds anyway, to test the kit)"
  fi
  say "node: $NODE_PY (Python $NODE_PY_VERSION), torch $TORCH_VERSION (CUDA $TORCH_CUDA) at $TORCH_FILE, $GPU_COUNT GPU(s)"

  # ---- 2. the temporary environment and the kit's wheels
  if [ -n "$WORK_GIVEN" ]; then WORK="$WORK_GIVEN"; mkdir -p "$WORK" || refuse 2 "cannot create $WORK"
  else WORK="$(mktemp -d "${TMPDIR:-/tmp}/cenet-gpu-check.XXXXXX")"; fi
  LOGS="$WORK/logs"; rm -rf "$LOGS" "$WORK/gpu_check"; mkdir -p "$LOGS"
  VENV="$WORK/venv"; VPY="$VENV/bin/python"
  local t0 site rc
  t0=$(date +%s)
  if [ ! -x "$VPY" ]; then
    "$NODE_PY" -m venv --without-pip "$VENV" > "$LOGS/venv.log" 2>&1 || { phase environment FAIL $(( $(date +%s) - t0 )) "python -m venv failed: $LOGS/venv.log"; finish 3; }
  fi
  site="$("$VPY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
  "$NODE_PY" - > "$site/_cenet_node_site.pth" <<'PYEOF'
import os, site
dirs = site.getsitepackages() + ([site.getusersitepackages()] if site.ENABLE_USER_SITE else [])
for d in dict.fromkeys(dirs):
    if os.path.isdir(d):
        print(f'import site; site.addsitedir({d!r})')
PYEOF
  if ! "$VPY" -m pip --version > /dev/null 2>&1; then
    "$VPY" -m ensurepip --default-pip >> "$LOGS/venv.log" 2>&1 || { phase environment FAIL $(( $(date +%s) - t0 )) "no pip for the temporary environment"; finish 3; }
  fi
  if [ "$("$VPY" -c 'import torch; print(torch.__file__)' 2>/dev/null)" != "$TORCH_FILE" ]; then
    phase environment FAIL $(( $(date +%s) - t0 )) "the temporary environment does not import the node's torch ($TORCH_FILE)"; finish 3
  fi
  "$VPY" -m pip install --disable-pip-version-check --no-index --no-deps --ignore-installed \
      --no-warn-script-location "$KIT"/wheels/*.whl > "$LOGS/pip_install.log" 2>&1
  rc=$?
  if [ "$rc" -ne 0 ]; then
    phase install FAIL $(( $(date +%s) - t0 )) "pip install of the kit's wheels failed: logs/pip_install.log"; finish 3
  fi
  # shellcheck disable=SC2086
  if ! "$VPY" "$KIT/check_env.py" --requirements $KIT_DISTS > "$LOGS/requirements.txt" 2>&1; then
    cat "$LOGS/requirements.txt"
    phase install FAIL $(( $(date +%s) - t0 )) "the node lacks what the kit assumed (requirements.txt); make the kit with --node-has without those names"
    finish 3
  fi
  if ! "$VPY" -c 'import pytest' >> "$LOGS/requirements.txt" 2>&1; then
    phase install FAIL $(( $(date +%s) - t0 )) "the node has no pytest, which runs gpu_check's CUDA tests; make the kit with --node-has without pytest"
    finish 3
  fi
  if [ "$("$VPY" -c 'import torch; print(torch.__file__, torch.__version__)' 2>/dev/null)" != "$TORCH_FILE $TORCH_VERSION" ]; then
    phase install FAIL $(( $(date +%s) - t0 )) "after the install, torch is not the node's $TORCH_VERSION at $TORCH_FILE"; finish 3
  fi
  export PATH="$VENV/bin:$PATH"  # the kit's ninja
  phase install PASS $(( $(date +%s) - t0 )) "$(ls "$KIT"/wheels/*.whl | wc -l) wheels into $VENV; node's torch $TORCH_VERSION kept"

  # ---- 3. mmcv
  if [ "$CUDA_AVAILABLE" != "1" ]; then
    CUDA_WHY="no GPU visible to torch"
  elif [ "$TORCH_CUDA" = "None" ]; then
    CUDA_WHY="torch $TORCH_VERSION is not a CUDA build"
  elif ! NVCC="$(find_nvcc)"; then
    CUDA_WHY="no nvcc (PATH, CUDA_HOME, /usr/local/cuda)"
  else
    CUDA_POSSIBLE=1
    ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-$("$VPY" -c 'import torch; print(";".join(sorted({"%d.%d" % torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())})))')}"
  fi
  decide_mmcv_build
  say "mmcv build: $BUILD_MODE ops ($BUILD_WHY); estimates on $JOBS cores: CPU ops ${EST_CPU_S} s, CPU+CUDA ops ${EST_CUDA_S} s"
  t0=$(date +%s)
  build_mmcv "$BUILD_MODE" $(( $(left_s) - MIN_CHECK_S )); rc=$?
  if [ "$rc" -ne 0 ] && [ "$BUILD_MODE" = "cuda" ]; then
    local failed="CUDA ops build failed (status $rc after ${BUILD_SECONDS} s at [${BUILD_SOURCES}])"
    [ "$rc" -eq 124 ] && failed="CUDA ops build did not finish in time (${BUILD_SECONDS} s, at [${BUILD_SOURCES}])"
    if [ $(( $(left_s) - MIN_CHECK_S )) -gt "$EST_CPU_S" ]; then
      BUILD_MODE=cpu; BUILD_WHY="$failed; CPU ops built instead"
      build_mmcv cpu $(( $(left_s) - MIN_CHECK_S )); rc=$?
    else
      BUILD_WHY="$failed; no time left for the CPU ops"
    fi
  fi
  if [ "$rc" -ne 0 ]; then
    phase mmcv_build FAIL $(( $(date +%s) - t0 )) "$BUILD_MODE ops: status $rc; logs/mmcv_build_$BUILD_MODE.log"
    finish 4
  fi
  if ! "$VPY" -m pip install --disable-pip-version-check --no-index --no-deps --ignore-installed \
      "$WORK/dist-$BUILD_MODE"/mmcv-*.whl >> "$LOGS/pip_install.log" 2>&1; then
    phase mmcv_build FAIL $(( $(date +%s) - t0 )) "installing the built wheel failed: logs/pip_install.log"; finish 4
  fi
  phase mmcv_build PASS $(( $(date +%s) - t0 )) "$BUILD_MODE ops, build ${BUILD_SECONDS} s, ${BUILD_SOURCES} sources, MAX_JOBS=$JOBS; mmcv ops compiled with CUDA: $("$VPY" -c 'from mmcv.ops import get_compiling_cuda_version as v; print(v())' 2>&1 | tail -n 1)"

  # ---- 4. the plugin
  t0=$(date +%s)
  local src_dir="$SOURCE"
  if [ -z "$src_dir" ]; then
    rm -rf "$WORK/src" && mkdir -p "$WORK/src" && tar -xzf "$KIT/$SRC_TARBALL" -C "$WORK/src"
    src_dir="$WORK/src/cenet-mmdet"
  fi
  if ! "$VPY" -m pip install --disable-pip-version-check --no-index --no-deps --no-build-isolation \
      -e "$src_dir" >> "$LOGS/pip_install.log" 2>&1 \
      || ! (cd / && "$VPY" -c 'import cenet_mmdet' > "$LOGS/plugin_import.log" 2>&1); then
    phase plugin FAIL $(( $(date +%s) - t0 )) "install or 'import cenet_mmdet' failed: logs/pip_install.log, logs/plugin_import.log"
    finish 3
  fi
  "$VPY" "$KIT/check_env.py" --json "$LOGS/env.json" > "$LOGS/env.txt" 2>&1
  phase plugin PASS $(( $(date +%s) - t0 )) "cenet_mmdet from $src_dir imports; check_env.py: logs/env.txt"

  # ---- 5. gpu_check.sh
  local budget=$(( $(left_s) - 10 ))
  t0=$(date +%s)
  if [ "$budget" -lt "$MIN_CHECK_S" ]; then
    phase gpu_check FAIL 0 "not run: ${budget} s left of the ${BUDGET_S} s budget"
    finish 1
  fi
  say "gpu_check.sh with ${budget} s"
  CENET_VENV="$VENV" OUT_DIR="$WORK/gpu_check" GPU_CHECK_BUDGET_S="$budget" \
    GPU_CHECK_NO_CUDA_OPS_REASON="$BUILD_WHY" bash "$src_dir/tools/gpu/gpu_check.sh"
  rc=$?
  case "$rc" in
    0) phase gpu_check PASS $(( $(date +%s) - t0 )) "every step that ran passed" ;;
    2) phase gpu_check REFUSED $(( $(date +%s) - t0 )) "gpu_check.sh refused (exit 2): see offline_check.log" ;;
    *) phase gpu_check FAIL $(( $(date +%s) - t0 )) "exit $rc: see its table" ;;
  esac
  finish "$rc"
}

# run when executed; when sourced (the tests), only define the functions
if [ "${BASH_SOURCE[0]}" = "$0" ]; then
  main "$@"
fi
