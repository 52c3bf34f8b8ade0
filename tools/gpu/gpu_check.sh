#!/usr/bin/env bash
# GPU readiness check (issue #14), one command on a machine with CUDA:
#
#   bash tools/gpu/gpu_check.sh
#
# Steps, each under `timeout`, all within GPU_CHECK_BUDGET_S (default 600 s):
#   cuda_layers     pytest -m cuda tests/test_cuda/test_cuda_ce.py: CE (d=64, 16,
#                   pool_stats), SyncCE at world size 1, CE-ResNet-50 narrow on
#                   CUDA against float64 CPU references (float32 on the device
#                   within float32 round-off, float64 on the device within
#                   1e-10 / 1e-9); mean/std 1e3; TF32;
#                   test_cuda_nonfinite.py: a NaN batch skipped with no host sync
#   cuda_amp        pytest -m cuda tests/test_cuda/test_cuda_amp.py: autocast
#                   fp16/bf16 against float32
#   cuda_sync_ce    pytest -m cuda tests/test_cuda/test_cuda_sync_ce.py: SyncCE in
#                   2 processes (one GPU: gloo on CUDA tensors; 2 GPUs: NCCL)
#                   against one process on the concatenated batch
#   bench_backbones tools/benchmarks/bench_backbones.py --device cuda (R-50)
#   cuda_kernels    tools/benchmarks/dispatch_count.py --kernels --device cuda:
#                   CUDA kernels per iteration, CE-ResNet-50 and ResNet-50,
#                   eager and compiled (the GPU side of the op counts)
#   bench_detector  tools/benchmarks/bench_detector.py --device cuda
#                   (both through tools/gpu/cuda_peak.py: peak memory)
#   synthetic_data  tools/misc/make_synthetic_coco.py (16 train / 4 val images)
#   train_amp       tools/train.py <SyncCE Mask R-CNN smoke config> --amp,
#                   20 iterations + validation, one process; the loss at
#                   iteration 20 must be finite
#   cuda_compile    pytest -m cuda tests/test_cuda/test_cuda_compile.py
#                   (torch.compile on CUDA), where that file exists
#   bench_compile   bench_backbones.py --device cuda --compile (R-50), where
#                   bench_backbones.py has the --compile option
# then prints one markdown summary table (step, result, seconds, key numbers)
# under a header with the GPU (name, count, memory, capability, driver), torch,
# CUDA and cuDNN versions and mmcv's ops, also written to $OUT_DIR/summary.md
# with every step's log beside it.
#
# mmcv's CUDA ops (RoIAlign, NMS on the GPU) are needed by bench_detector,
# synthetic_data and train_amp (Mask R-CNN's RoI heads). Where mmcv was built
# with CPU ops only (mmcv.ops.get_compiling_cuda_version() is 'not available'),
# or GPU_CHECK_MMCV_CUDA_OPS=0, those steps are listed as SKIP with the reason
# (GPU_CHECK_NO_CUDA_OPS_REASON adds the caller's), and the others still run.
#
# Environment: CENET_VENV (default .venv), OUT_DIR (default work_dirs/gpu_check),
# GPU_CHECK_BUDGET_S (600), GPU_CHECK_DRY_RUN=1 (print the commands, run
# nothing, no GPU needed), GPU_CHECK_FULL_SUITE=1 (afterwards also the whole
# test suite, beyond the budget, timeout GPU_CHECK_SUITE_TIMEOUT_S=1800),
# GPU_CHECK_MMCV_CUDA_OPS (auto: ask mmcv; 0: skip the steps that need them;
# 1: run them).
# Exit status: 0 every step that ran passed (SKIP steps are listed, not failed);
# 1 a step failed or ran out of time; 2 no CUDA device, no Python environment or
# an mmcv without compiled ops (nothing of the plugin imports): nothing was run.
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
VENV="${CENET_VENV:-.venv}"
case "$VENV" in /*) ;; *) VENV="$ROOT/$VENV" ;; esac
PY="$VENV/bin/python"
OUT_DIR="${OUT_DIR:-$ROOT/work_dirs/gpu_check}"
case "$OUT_DIR" in /*) ;; *) OUT_DIR="$PWD/$OUT_DIR" ;; esac
BUDGET_S="${GPU_CHECK_BUDGET_S:-600}"
DRY_RUN="${GPU_CHECK_DRY_RUN:-0}"
FULL_SUITE="${GPU_CHECK_FULL_SUITE:-0}"
SUITE_TIMEOUT_S="${GPU_CHECK_SUITE_TIMEOUT_S:-1800}"
MMCV_CUDA_OPS="${GPU_CHECK_MMCV_CUDA_OPS:-auto}"
NO_CUDA_OPS_REASON="${GPU_CHECK_NO_CUDA_OPS_REASON:-}"
COMPILE_TEST="tests/test_cuda/test_cuda_compile.py"
DATA_DIR="$OUT_DIR/data_root"
TRAIN_DIR="$OUT_DIR/train_amp"
SMOKE_CONFIG="$ROOT/configs/cenet/smoke/mask-rcnn_syncce-r50_fpn_shapes-smoke.py"
TRAIN_ITERS=20

STEPS=()
declare -A RESULT SECONDS_TAKEN KEYS
START_S="$(date +%s)"

say() { echo "[gpu_check] $*"; }

refuse() {  # message: nothing is run, exit 2
  echo "[gpu_check] $1" >&2
  exit 2
}

check_environment() {
  [ -x "$PY" ] || refuse "no Python environment at $VENV (set CENET_VENV, or run 'bash tools/setup_env.sh')"
  local probe
  # stdout's last line only: warnings on stderr do not disturb the answer
  probe="$("$PY" -c 'import torch; print(int(torch.cuda.is_available()), torch.__version__, torch.version.cuda)' 2>/dev/null | tail -n 1)"
  [ -n "$probe" ] || refuse "cannot import torch with $PY (try: $PY -c 'import torch')"
  if [ "${probe%% *}" != "1" ]; then
    refuse "no CUDA device: torch.cuda.is_available() is False (torch ${probe#* }). This check needs a machine with a GPU; nothing was run. (GPU_CHECK_DRY_RUN=1 prints the commands.)"
  fi
  check_mmcv_ops
}

# mmcv's compiled ops: without them nothing of the plugin imports (mmdet.models
# imports mmcv.ops); without their CUDA part the RoI heads cannot run on the GPU.
check_mmcv_ops() {
  local probe
  probe="$("$PY" -c 'import mmcv; from mmcv.ops import get_compiling_cuda_version as v; print(mmcv.__version__, v())' 2>/dev/null | tail -n 1)"
  [ -n "$probe" ] || refuse "mmcv has no compiled ops in $VENV ('from mmcv.ops import get_compiling_cuda_version' fails): nothing of the plugin imports. Build mmcv with its ops (bash tools/setup_env.sh, or tools/gpu/run_offline_check.sh in an offline kit); nothing was run."
  MMCV_LINE="mmcv ${probe%% *}, ops compiled with CUDA: ${probe#* }"
  set_cuda_ops "${probe#* }"
}

set_cuda_ops() {  # compiling-CUDA version reported by mmcv ("not available": CPU ops only)
  CUDA_OPS=1
  case "$MMCV_CUDA_OPS" in
    0) CUDA_OPS=0; NO_CUDA_OPS_WHY="${NO_CUDA_OPS_REASON:-GPU_CHECK_MMCV_CUDA_OPS=0}" ;;
    1) ;;
    *) if [ "$1" = "not available" ]; then
         CUDA_OPS=0
         NO_CUDA_OPS_WHY="mmcv was built without CUDA ops${NO_CUDA_OPS_REASON:+ ($NO_CUDA_OPS_REASON)}"
       fi ;;
  esac
}
CUDA_OPS=1
NO_CUDA_OPS_WHY=""
MMCV_LINE=""

remaining_s() { echo $(( BUDGET_S - ($(date +%s) - START_S) )); }

# run_step NAME TIMEOUT_S CWD CMD...: run CMD in CWD with `timeout`, log to
# $OUT_DIR/NAME.log, record PASS/FAIL/TIMEOUT and the seconds taken.
run_step() {
  local name="$1" limit="$2" cwd="$3"
  shift 3
  STEPS+=("$name")
  if [ "$DRY_RUN" = "1" ]; then
    echo "[dry-run] $name (timeout ${limit}s, cwd $cwd): $*"
    RESULT[$name]="DRY"; SECONDS_TAKEN[$name]="-"; KEYS[$name]=""
    return 0
  fi
  local left
  left="$(remaining_s)"
  if [ "$limit" -gt "$left" ]; then limit="$left"; fi
  if [ "$left" -lt 10 ]; then
    RESULT[$name]="FAIL (no time left)"; SECONDS_TAKEN[$name]="0"; KEYS[$name]=""
    say "$name: not run, the ${BUDGET_S}s budget is spent"
    return 1
  fi
  say "$name: $* (timeout ${limit}s)"
  local log="$OUT_DIR/$name.log" t0 rc
  t0="$(date +%s.%N)"
  ( cd "$cwd" && timeout --kill-after=10 "$limit" "$@" ) >"$log" 2>&1
  rc=$?
  SECONDS_TAKEN[$name]="$(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN{printf "%.1f", b-a}')"
  if [ "$rc" -eq 0 ]; then
    RESULT[$name]="PASS"
  elif [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
    RESULT[$name]="FAIL (timeout ${limit}s)"
  else
    RESULT[$name]="FAIL (exit $rc)"
  fi
  KEYS[$name]=""
  say "$name: ${RESULT[$name]} in ${SECONDS_TAKEN[$name]}s (log: $log)"
  [ "$rc" -eq 0 ]
}

fail_step() {  # name reason: a step that ran but whose output is wrong
  RESULT[$1]="FAIL ($2)"
}

skip_step() {  # name reason: a step not run, listed with why (not a failure)
  STEPS+=("$1")
  RESULT[$1]="SKIP ($2)"; SECONDS_TAKEN[$1]="-"; KEYS[$1]=""
  if [ "$DRY_RUN" = "1" ]; then
    echo "[dry-run-skip] $1: $2"
  else
    say "$1: skipped ($2)"
  fi
}

pytest_keys() {  # name: the pytest summary line of its log
  local line
  line="$(grep -E '[0-9]+ (passed|failed|error|skipped)' "$OUT_DIR/$1.log" 2>/dev/null | tail -n 1 | tr -d '=' | sed 's/^ *//; s/ *$//')"
  KEYS[$1]="${line:-no pytest summary}"
  # the tests must have run on the device (pytest -rs lists skip reasons)
  if grep -q 'needs a CUDA device' "$OUT_DIR/$1.log" 2>/dev/null \
      && [ "${RESULT[$1]}" = "PASS" ]; then
    fail_step "$1" "tests skipped"
  fi
}

peak_keys() {  # name: the peak-memory line of tools/gpu/cuda_peak.py
  local line
  line="$(grep 'peak CUDA memory allocated:' "$OUT_DIR/$1.log" 2>/dev/null | tail -n 1)"
  KEYS[$1]="${line#peak CUDA memory allocated: }"
  KEYS[$1]="peak ${KEYS[$1]:-not reported}"
}

train_keys() {  # name: loss/memory at the last iteration, AP after it
  local log="$OUT_DIR/$1.log" line loss memory ap
  line="$(grep -F "Iter(train) [$TRAIN_ITERS/$TRAIN_ITERS]" "$log" 2>/dev/null | tail -n 1)"
  loss="$(grep -oE '(^| )loss: [^ ]+' <<<"$line" | head -n 1 | awk '{print $2}')"
  memory="$(grep -oE 'memory: [0-9]+' <<<"$line" | awk '{print $2}')"
  ap="$(grep -oE 'coco/bbox_mAP: [^ ]+' "$log" 2>/dev/null | tail -n 1 | awk '{print $2}')"
  KEYS[$1]="iter $TRAIN_ITERS loss ${loss:-missing}, memory ${memory:-?} MB, bbox mAP ${ap:-?}"
  if [ "${RESULT[$1]}" = "PASS" ] && ! awk -v x="${loss:-nan}" \
      'BEGIN{ if (x ~ /^-?[0-9.]+(e[-+]?[0-9]+)?$/) exit 0; exit 1 }'; then
    fail_step "$1" "no finite loss at iteration $TRAIN_ITERS"
  fi
}

backbone_flags() {  # the released-transcription row is slow and optional
  if grep -q -- '--no-released' "$ROOT/tools/benchmarks/bench_backbones.py"; then
    echo "--no-released"
  fi
}

has_compile_flag() {  # bench_backbones.py declares a --compile option
  grep -qE -- "['\"]--compile['\"]" "$ROOT/tools/benchmarks/bench_backbones.py" 2>/dev/null
}

run_all() {
  local pytest=("$PY" -m pytest -q -p no:cacheprovider -m cuda -rs)
  run_step cuda_layers 200 "$ROOT" "${pytest[@]}" tests/test_cuda/test_cuda_ce.py tests/test_cuda/test_cuda_nonfinite.py
  [ "$DRY_RUN" = "1" ] || pytest_keys cuda_layers
  run_step cuda_amp 120 "$ROOT" "${pytest[@]}" tests/test_cuda/test_cuda_amp.py
  [ "$DRY_RUN" = "1" ] || pytest_keys cuda_amp
  run_step cuda_sync_ce 200 "$ROOT" "${pytest[@]}" tests/test_cuda/test_cuda_sync_ce.py
  [ "$DRY_RUN" = "1" ] || pytest_keys cuda_sync_ce
  # shellcheck disable=SC2046
  run_step bench_backbones 150 "$ROOT" "$PY" tools/gpu/cuda_peak.py \
    tools/benchmarks/bench_backbones.py --device cuda --depths 50 --warmup 1 \
    --repeat 3 $(backbone_flags)
  [ "$DRY_RUN" = "1" ] || peak_keys bench_backbones
  run_step cuda_kernels 150 "$ROOT" "$PY" tools/benchmarks/dispatch_count.py \
    --kernels --device cuda
  if [ "$CUDA_OPS" = "1" ]; then
    run_step bench_detector 180 "$ROOT" "$PY" tools/gpu/cuda_peak.py \
      tools/benchmarks/bench_detector.py --device cuda --warmup 1 --repeat 3
    [ "$DRY_RUN" = "1" ] || peak_keys bench_detector
    run_step synthetic_data 60 "$ROOT" "$PY" tools/misc/make_synthetic_coco.py \
      "$DATA_DIR/data/synthetic_shapes" --train 16 --val 4 --size 128 --seed 0
    # the smoke config's data_root is relative: run from the data folder
    run_step train_amp 240 "$DATA_DIR" "$PY" "$ROOT/tools/train.py" "$SMOKE_CONFIG" \
      --amp --work-dir "$TRAIN_DIR" --cfg-options "train_cfg.max_iters=$TRAIN_ITERS" \
      "train_cfg.val_interval=$TRAIN_ITERS" "default_hooks.checkpoint.interval=$TRAIN_ITERS"
    [ "$DRY_RUN" = "1" ] || train_keys train_amp
  else
    local why="needs mmcv's CUDA ops (RoI heads): $NO_CUDA_OPS_WHY"
    skip_step bench_detector "$why"
    skip_step synthetic_data "$why"
    skip_step train_amp "$why"
  fi
  if [ -f "$ROOT/$COMPILE_TEST" ]; then
    run_step cuda_compile 180 "$ROOT" "${pytest[@]}" "$COMPILE_TEST"
    [ "$DRY_RUN" = "1" ] || pytest_keys cuda_compile
  else
    skip_step cuda_compile "no $COMPILE_TEST"
  fi
  if has_compile_flag; then
    # shellcheck disable=SC2046
    run_step bench_compile 240 "$ROOT" "$PY" tools/gpu/cuda_peak.py \
      tools/benchmarks/bench_backbones.py --device cuda --depths 50 --warmup 1 \
      --repeat 3 --compile $(backbone_flags)
    [ "$DRY_RUN" = "1" ] || peak_keys bench_compile
  else
    skip_step bench_compile "bench_backbones.py has no --compile option"
  fi
  if [ "$FULL_SUITE" = "1" ]; then
    BUDGET_S=$(( $(date +%s) - START_S + SUITE_TIMEOUT_S ))
    run_step full_suite "$SUITE_TIMEOUT_S" "$ROOT" "$PY" -m pytest -q -p no:cacheprovider tests
    [ "$DRY_RUN" = "1" ] || pytest_keys full_suite
  fi
}

machine_line() {  # the GPU(s), driver, torch, CUDA and cuDNN versions
  local driver
  driver="$(nvidia-smi --query-gpu=driver_version --format=csv,noheader 2>/dev/null | head -n 1)"
  GPU_CHECK_DRIVER="${driver:-unknown}" "$PY" - <<'PYEOF' 2>&1 | tail -n 1
import os
import torch
cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
versions = (f'torch {torch.__version__}, CUDA {torch.version.cuda}, cuDNN {cudnn}, '
            f'driver {os.environ["GPU_CHECK_DRIVER"]}')
if torch.cuda.is_available():
    names = {}
    for i in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(i)
        key = f'{p.name}, {p.total_memory / 2**30:.0f} GiB, capability {p.major}.{p.minor}'
        names[key] = names.get(key, 0) + 1
    gpus = '; '.join(f'{n} x {k}' for k, n in names.items())
    print(f'{gpus}; {versions}')
else:
    print(f'no CUDA device; {versions}')
PYEOF
}

summary() {  # print and save the table; status 1 if any step did not pass
  local failed=0 name
  {
    echo "GPU check, $(date -u '+%Y-%m-%d %H:%M UTC'): $(machine_line); total $(( $(date +%s) - START_S )) s"
    if [ -n "$MMCV_LINE" ]; then echo; echo "$MMCV_LINE"; fi
    echo
    echo "| step | result | seconds | key numbers |"
    echo "|---|---|---|---|"
    for name in "${STEPS[@]}"; do
      echo "| $name | ${RESULT[$name]} | ${SECONDS_TAKEN[$name]} | ${KEYS[$name]} |"
    done
  } | tee "$OUT_DIR/summary.md"
  for name in "${STEPS[@]}"; do  # not in the pipeline above: a subshell
    case "${RESULT[$name]}" in PASS|SKIP*) ;; *) failed=1 ;; esac
  done
  return "$failed"
}

main() {
  if [ "$DRY_RUN" = "1" ]; then
    say "dry run: the commands, nothing is run (python: $PY, logs: $OUT_DIR)"
    # mmcv is not asked in a dry run: GPU_CHECK_MMCV_CUDA_OPS=0 shows the skips
    set_cuda_ops "dry run"
    run_all
    exit 0
  fi
  check_environment
  mkdir -p "$OUT_DIR" || refuse "cannot create $OUT_DIR"
  rm -rf "$DATA_DIR" "$TRAIN_DIR"
  say "logs in $OUT_DIR; budget ${BUDGET_S}s"
  run_all
  echo
  if summary; then
    if printf '%s\n' "${RESULT[@]}" | grep -q '^SKIP'; then
      say "every step that ran passed; the SKIP steps were not run (reasons in the table)"
    else
      say "all steps passed"
    fi
    exit 0
  fi
  say "some steps FAILED: see the logs in $OUT_DIR"
  exit 1
}

# run when executed; when sourced (the tests), only define the functions
if [ "${BASH_SOURCE[0]}" = "$0" ]; then
  main
fi
