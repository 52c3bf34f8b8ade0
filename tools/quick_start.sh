#!/usr/bin/env bash
# The 5-minute CPU quick start: generate the synthetic shapes set, train a
# CE-ResNet-50 Mask R-CNN on it for a few iterations, test it with
# tools/test.py, and print its box and mask AP.
#
#   bash tools/quick_start.sh [WORK_DIR]        (default work_dirs/quick_start)
#
# The terminal gets 7 lines (13 at most when stdout is not a terminal): for
# each stage (1/3 data, 2/3 train, 3/3 test) a line that names its log, then
# its progress line (iterations with the loss, test images), redrawn in place
# on a terminal and printed at each quarter and the end otherwise; and last,
# the box and mask AP line. tools/misc/quick_start_stage.py runs each stage
# and writes all its output (MMEngine's log lines included) to
# WORK_DIR/logs/{data,train,test}.log. A stage that fails stops the run with
# its exit status, and prints the last 20 lines of its log and the log's path
# on stderr.
#
# Everything is written under WORK_DIR: logs/ (the three stage logs), data/
# (the generated set), the training run (iter_N.pth and MMEngine's own
# TIMESTAMP/ log folder) and test/ (the test run's log and metrics).
# Environment (the defaults take about 75 s on 2 free cores with
# OMP_NUM_THREADS=1; QS_ITERS and QS_BATCH are whole numbers >= 1):
#   QS_ITERS   training iterations (60)        QS_BATCH  images per iteration (2)
#   QS_TRAIN   training images (120)           QS_VAL    test images (20)
#   QS_SIZE    image side in pixels (128)      QS_SEED   data seed (0)
#   CENET_VENV the environment of tools/setup_env.sh (default .venv; PYTHON
#              overrides the interpreter)
# The smallest run (the test suite's): QS_ITERS=1 QS_TRAIN=2 QS_VAL=2 QS_SIZE=64.
set -euo pipefail

main() {
  local root work data logs config python classes iters batch start name
  root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
  work="${1:-work_dirs/quick_start}"
  data="$work/data"
  logs="$work/logs"
  config="$root/configs/cenet/quick_start/mask-rcnn_ce-r50_fpn_shapes-quickstart.py"
  python="${PYTHON:-${CENET_VENV:-$root/.venv}/bin/python}"
  if [ ! -x "$python" ] && ! command -v "$python" >/dev/null 2>&1; then
    echo "[quick_start] no Python at $python: run 'bash tools/setup_env.sh' first" >&2
    exit 1
  fi
  # the classes of the config (those of configs/cenet/synthetic/*-bench.py)
  classes="circle,square,triangle,hexagon,star,cross"
  iters="${QS_ITERS:-60}"
  batch="${QS_BATCH:-2}"
  for name in QS_ITERS QS_BATCH; do
    case "${!name:-1}" in
      *[!0-9]*|0*)   # not digits, or 0 or a leading zero (octal to bash)
        echo "[quick_start] $name must be a whole number >= 1, got '${!name}'" >&2
        exit 2 ;;
    esac
  done
  start=$(date +%s)
  # each stage: its full output to $logs/NAME.log, a progress line here
  stage() {
    local label="$1" kind="$2"; shift 2
    "$python" "$root/tools/misc/quick_start_stage.py" --label "$label" \
      --kind "$kind" --log "$logs/$kind.log" -- "$@"
  }

  echo "[quick_start] 1/3 synthetic shapes set -> $data (log: $logs/data.log)"
  stage "1/3 data" data "$python" "$root/tools/misc/make_synthetic_coco.py" "$data" \
    --train "${QS_TRAIN:-120}" --val "${QS_VAL:-20}" --size "${QS_SIZE:-128}" \
    --seed "${QS_SEED:-0}" --classes "$classes"

  # MMEngine's logger interval: about 60 log lines (progress steps) per run
  echo "[quick_start] 2/3 train CE-R50 Mask R-CNN: $iters iterations x $batch images" \
    "(log: $logs/train.log)"
  stage "2/3 train" train "$python" "$root/tools/train.py" "$config" --work-dir "$work" \
    --cfg-options "data_root=$data/" "train_cfg.max_iters=$iters" \
    "train_cfg.val_interval=$iters" "train_cfg.val_begin=$(( iters + 1 ))" \
    "default_hooks.checkpoint.interval=$iters" \
    "default_hooks.logger.interval=$(( (iters + 59) / 60 ))" \
    "train_dataloader.batch_size=$batch"

  echo "[quick_start] 3/3 test $work/iter_$iters.pth (log: $logs/test.log)"
  stage "3/3 test" test "$python" "$root/tools/test.py" "$config" \
    "$work/iter_$iters.pth" --work-dir "$work/test" \
    --cfg-options "data_root=$data/" "default_hooks.logger.interval=1"

  "$python" - "$work/test" "$iters" "$(( $(date +%s) - start ))" "$logs/test.log" <<'PY'
import glob, json, os, sys
test_dir, iters, seconds, log = sys.argv[1:]
logs = sorted(glob.glob(os.path.join(test_dir, '*', '*.json')), key=os.path.getmtime)
if not logs:
    sys.exit(f'[quick_start] no metrics written under {test_dir}; see {log}')
with open(logs[-1]) as f:
    metrics = json.loads(f.read().strip().splitlines()[-1])
if 'coco/bbox_mAP' not in metrics or 'coco/segm_mAP' not in metrics:
    sys.exit(f'[quick_start] no box and mask AP in {logs[-1]}: '
             f'{sorted(metrics)}; see {log}')
box, mask = metrics['coco/bbox_mAP'], metrics['coco/segm_mAP']
print(f'[quick_start] CE-R50 Mask R-CNN after {iters} iterations: '
      f'box AP {100 * box:.1f}, mask AP {100 * mask:.1f} '
      f'(COCO AP x 100; {seconds} s in all; metrics: {logs[-1]})')
PY
}

main "$@"
