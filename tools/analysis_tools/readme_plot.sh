#!/usr/bin/env bash
# BN-R50 vs CE-R50 channel analysis of trained models: runs the three channel
# analysis tools on the seed-0 BN and CE checkpoints of
# tools/experiments/multi_seed_ap.py (its default budget; trained first, seed 0
# only, if missing) and copies the sparsity plot to the figure of
# docs/evidence.md.
#
#   bash tools/analysis_tools/readme_plot.sh [WORK_DIR]   (default work_dirs/multi_seed_ap)
#
# Checkpoints: WORK_DIR/bn-ce/{bn,ce}/seed0/iter_$ITERS.pth.
#
# Environment: PYTHON, ITERS (default 300), DATA (default
# data/synthetic_shapes_multi_seed, the driver's), NUM_IMAGES (sparsity
# images, default 8), AII_IMAGES (default 32), RATIOS (default
# "0 0.2 0.4 0.6"), ABLATION_IMAGES (evaluate the ablation on the first N
# validation images; default 100), FIGURE (default
# docs/figures/channel_sparsity_synthetic.png; empty: no copy).
set -eo pipefail

main() {
  ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
  PYTHON=${PYTHON:-python}
  WORK_DIR=${1:-work_dirs/multi_seed_ap}
  ITERS=${ITERS:-300}
  DATA=${DATA:-data/synthetic_shapes_multi_seed}
  DATA=${DATA%/}
  NUM_IMAGES=${NUM_IMAGES:-8}
  AII_IMAGES=${AII_IMAGES:-32}
  RATIOS=${RATIOS:-"0 0.2 0.4 0.6"}
  ABLATION_IMAGES=${ABLATION_IMAGES:-100}
  FIGURE=${FIGURE-docs/figures/channel_sparsity_synthetic.png}
  OUT="$WORK_DIR/channel_analysis"
  BN_CKPT="$WORK_DIR/bn-ce/bn/seed0/iter_$ITERS.pth"
  CE_CKPT="$WORK_DIR/bn-ce/ce/seed0/iter_$ITERS.pth"
  BENCH="$ROOT/configs/cenet/synthetic"

  if [ ! -f "$BN_CKPT" ] || [ ! -f "$CE_CKPT" ]; then
    echo "[readme_plot] training BN and CE, seed 0, $ITERS iterations (multi_seed_ap.py)"
    $PYTHON "$ROOT/tools/experiments/multi_seed_ap.py" --work-dir "$WORK_DIR" \
      --data "$DATA" --iters "$ITERS" --seeds 0
  fi

  MODELS=("$BENCH/mask-rcnn_r50_fpn_shapes-bench.py" "$BN_CKPT"
          "$BENCH/mask-rcnn_ce-r50_fpn_shapes-bench.py" "$CE_CKPT")
  OPTIONS=("test_dataloader.dataset.data_root=$DATA/"
           "test_evaluator.ann_file=$DATA/annotations/instances_val.json")
  TOOLS="$ROOT/tools/analysis_tools"
  # The ablation runs on the first ABLATION_IMAGES validation images, with an
  # annotation file of exactly those images for the dataset and the evaluator
  # (dataset.indices alone would leave COCO evaluating against all images of
  # the split, so that AP counts the images not run as misses).
  mkdir -p "$OUT"
  SUBSET="$(cd "$OUT" && pwd)/instances_val_first$ABLATION_IMAGES.json"
  $PYTHON - "$DATA/annotations/instances_val.json" "$SUBSET" "$ABLATION_IMAGES" <<'PY'
import json
import sys
source, target, count = sys.argv[1], sys.argv[2], int(sys.argv[3])
with open(source) as f:
    data = json.load(f)
data['images'] = data['images'][:count]
kept = {image['id'] for image in data['images']}
data['annotations'] = [a for a in data['annotations'] if a['image_id'] in kept]
with open(target, 'w') as f:
    json.dump(data, f)
PY
  ABLATION_OPTIONS=("test_dataloader.dataset.ann_file=$SUBSET"
                    "test_evaluator.ann_file=$SUBSET")
  # shellcheck disable=SC2086
  $PYTHON "$TOOLS/channel_sparsity.py" "${MODELS[@]}" --labels BN CE \
    --out-dir "$OUT" --num-images "$NUM_IMAGES" --cfg-options "${OPTIONS[@]}"
  # shellcheck disable=SC2086
  $PYTHON "$TOOLS/channel_ablation.py" "${MODELS[@]}" --labels BN CE \
    --out-dir "$OUT" --ratios $RATIOS \
    --cfg-options "${OPTIONS[@]}" "${ABLATION_OPTIONS[@]}"
  $PYTHON "$TOOLS/aii_spectrum.py" "${MODELS[@]}" --labels BN CE \
    --out-dir "$OUT" --num-images "$AII_IMAGES" \
    --layers bn1 layer1.0.bn3 layer2.0.bn3 layer3.0.bn3 \
    --cfg-options "${OPTIONS[@]}"
  if [ -n "$FIGURE" ]; then
    mkdir -p "$(dirname "$FIGURE")"
    cp "$OUT/sparsity.png" "$FIGURE"
    echo "[readme_plot] copied $OUT/sparsity.png to $FIGURE"
  fi
}

main "$@"
