#!/usr/bin/env bash
# BN-R50 vs CE-R50 Mask R-CNN from scratch on a hard synthetic shapes set, at
# the same budget (same data, iterations, batch and schedule); prints box and
# mask AP of both over the evaluation points (the AP curve) and at the end.
#
#   bash tools/benchmarks/synthetic_ap.sh [WORK_DIR]      (default work_dirs/synthetic_ap)
#
# Default budget (configs/cenet/synthetic/*-bench.py): 360 iterations x 4
# images of 128 px (about 1.8 epochs of 800 images), evaluation on 100 images
# every 90 iterations. Planned from the project's performance notes (BN-R50 Mask R-CNN
# about 6 s per 4-image iteration at 160 px on 2 idle cores; CE adds roughly
# 15-30% per step): about 25-30 minutes for BN and 30-40 for CE, an hour or
# a little more in all. Run it alone: it uses all cores, and shared cores slow
# it down a lot. The data set (6 classes, 2-7 shapes, radius 6-20% of the
# image, up to 50% occluded, low contrast allowed) is harder than the one in
# which 300 iterations already reached box AP 78.
#
# Environment overrides (for a quick check, e.g. ITERS=5 VAL_INTERVAL=5
# NUM_TRAIN=16 NUM_VAL=4):
#   PYTHON        interpreter (default: python)
#   DATA          data set directory (default: data/synthetic_shapes_hard);
#                 generated if missing or made with other arguments
#   NUM_TRAIN, NUM_VAL, SIZE, SEED   generator settings (800, 100, 128, 0)
#   ITERS, VAL_INTERVAL              override the configs' 360 and 90
#   MODELS        which to run (default: "bn ce")
set -eo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
PYTHON=${PYTHON:-python}
WORK_DIR=${1:-work_dirs/synthetic_ap}
DATA=${DATA:-data/synthetic_shapes_hard}
NUM_TRAIN=${NUM_TRAIN:-800}
NUM_VAL=${NUM_VAL:-100}
SIZE=${SIZE:-128}
SEED=${SEED:-0}
MODELS=${MODELS:-"bn ce"}
DATA=${DATA%/}

GEN_ARGS="--train $NUM_TRAIN --val $NUM_VAL --size $SIZE --seed $SEED \
--classes circle,square,triangle,hexagon,star,cross --min-objects 2 \
--max-objects 7 --min-radius 0.06 --max-radius 0.2 --max-occlusion 0.5 \
--noise 14 --min-contrast 30"

if [ ! -f "$DATA/annotations/instances_val.json" ] || \
   [ "$(cat "$DATA/generator_args.txt" 2>/dev/null)" != "$GEN_ARGS" ]; then
  echo "[synthetic_ap] generating $DATA"
  rm -rf "$DATA"
  # shellcheck disable=SC2086
  $PYTHON "$ROOT/tools/misc/make_synthetic_coco.py" "$DATA" $GEN_ARGS
  echo "$GEN_ARGS" > "$DATA/generator_args.txt"
fi

OPTIONS=(
  "train_dataloader.dataset.data_root=$DATA/"
  "val_dataloader.dataset.data_root=$DATA/"
  "test_dataloader.dataset.data_root=$DATA/"
  "val_evaluator.ann_file=$DATA/annotations/instances_val.json"
  "test_evaluator.ann_file=$DATA/annotations/instances_val.json"
)
[ -n "$ITERS" ] && OPTIONS+=("train_cfg.max_iters=$ITERS" \
  "default_hooks.checkpoint.interval=$ITERS")
[ -n "$VAL_INTERVAL" ] && OPTIONS+=("train_cfg.val_interval=$VAL_INTERVAL")

declare -A CONFIGS=(
  [bn]="$ROOT/configs/cenet/synthetic/mask-rcnn_r50_fpn_shapes-bench.py"
  [ce]="$ROOT/configs/cenet/synthetic/mask-rcnn_ce-r50_fpn_shapes-bench.py"
)
RUN_DIRS=()
for model in $MODELS; do
  config=${CONFIGS[$model]}
  if [ -z "$config" ]; then
    echo "[synthetic_ap] unknown model '$model' (choose from: ${!CONFIGS[*]})" >&2
    exit 2
  fi
  echo "[synthetic_ap] training $model: $config"
  start=$(date +%s)
  $PYTHON "$ROOT/tools/train.py" "$config" --work-dir "$WORK_DIR/$model" \
    --cfg-options "${OPTIONS[@]}"
  echo "[synthetic_ap] $model done in $(( $(date +%s) - start )) s"
  RUN_DIRS+=("$model=$WORK_DIR/$model")
done

$PYTHON "$ROOT/tools/benchmarks/synthetic_ap_report.py" "${RUN_DIRS[@]}"
