#!/usr/bin/env bash
# BN-R50 vs CE-R50 Mask R-CNN from scratch on a synthetic shapes set, at
# the same budget (same data, iterations, batch and schedule); prints box and
# mask AP of both over the evaluation points (the AP curve) and at the end.
#
#   bash tools/benchmarks/synthetic_ap.sh [WORK_DIR]      (default work_dirs/synthetic_ap)
#
# Default budget (configs/cenet/synthetic/*-bench.py): 300 iterations x 4
# images of 128 px (1.5 epochs of 800 images), evaluation on 100 images at
# iterations 150 and 300. Measured on 2 idle cores: about 4.5 s per BN
# iteration, 3-4 minutes per evaluation, about 30 minutes per model. Run it
# alone: it uses all cores, and shared cores slow it down a lot. The data set
# (6 classes, 2-5 shapes, radius 7-22% of the image, up to 40% occluded,
# colour not tied to class) is harder than the colour-coded 3-class set in
# which 300 iterations already reached box AP 78.
#
# Environment overrides (for a quick check, e.g. ITERS=5 VAL_INTERVAL=5
# NUM_TRAIN=16 NUM_VAL=4):
#   PYTHON        interpreter (default: python)
#   DATA          data set directory (default: data/synthetic_shapes_bench);
#                 generated if missing or made with other arguments
#   NUM_TRAIN, NUM_VAL, SIZE, SEED   generator settings (800, 100, 128, 0)
#   ITERS, VAL_INTERVAL              override the configs' 300 and 150
#   MODELS        which to run (default: "bn ce")
set -eo pipefail

# Everything runs inside main, so bash has read the whole script before the
# first (hour-long) step: editing or updating the file during a run cannot
# change what the rest of the run executes.
main() {
  ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
  PYTHON=${PYTHON:-python}
  WORK_DIR=${1:-work_dirs/synthetic_ap}
  DATA=${DATA:-data/synthetic_shapes_bench}
  NUM_TRAIN=${NUM_TRAIN:-800}
  NUM_VAL=${NUM_VAL:-100}
  SIZE=${SIZE:-128}
  SEED=${SEED:-0}
  MODELS=${MODELS:-"bn ce"}
  DATA=${DATA%/}

  declare -A CONFIGS=(
    [bn]="$ROOT/configs/cenet/synthetic/mask-rcnn_r50_fpn_shapes-bench.py"
    [ce]="$ROOT/configs/cenet/synthetic/mask-rcnn_ce-r50_fpn_shapes-bench.py"
  )
  for model in $MODELS; do
    if [ -z "${CONFIGS[$model]}" ]; then
      echo "[synthetic_ap] unknown model '$model' (choose from: ${!CONFIGS[*]})" >&2
      exit 2
    fi
  done

  # one line: the string is compared with the generator_args.txt of $DATA
  GEN_ARGS="--train $NUM_TRAIN --val $NUM_VAL --size $SIZE --seed $SEED"
  GEN_ARGS+=" --classes circle,square,triangle,hexagon,star,cross"
  GEN_ARGS+=" --min-objects 2 --max-objects 5 --min-radius 0.07"
  GEN_ARGS+=" --max-radius 0.22 --max-occlusion 0.4 --noise 10 --min-contrast 40"

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
  # the step of the schedule (param_scheduler[1]) moves with ITERS: 5/6 of the run
  [ -n "$ITERS" ] && OPTIONS+=("train_cfg.max_iters=$ITERS" \
    "default_hooks.checkpoint.interval=$ITERS" \
    "param_scheduler.1.end=$ITERS" \
    "param_scheduler.1.milestones=[$(( ITERS * 5 / 6 ))]")
  [ -n "$VAL_INTERVAL" ] && OPTIONS+=("train_cfg.val_interval=$VAL_INTERVAL")

  RUN_DIRS=()
  for model in $MODELS; do
    config=${CONFIGS[$model]}
    echo "[synthetic_ap] training $model: $config"
    start=$(date +%s)
    $PYTHON "$ROOT/tools/train.py" "$config" --work-dir "$WORK_DIR/$model" \
      --cfg-options "${OPTIONS[@]}"
    echo "[synthetic_ap] $model done in $(( $(date +%s) - start )) s"
    RUN_DIRS+=("$model=$WORK_DIR/$model")
  done

  $PYTHON "$ROOT/tools/benchmarks/synthetic_ap_report.py" "${RUN_DIRS[@]}"
}

main "$@"
