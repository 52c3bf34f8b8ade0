#!/usr/bin/env bash
# BN-R50 vs CE-R50 channel analysis on the synthetic benchmark models: runs the
# three channel analysis tools on the checkpoints of
# tools/benchmarks/synthetic_ap.sh (trained first if missing) and copies the
# sparsity plot to the README's figure.
#
#   bash tools/analysis_tools/readme_plot.sh [WORK_DIR]   (default work_dirs/synthetic_ap)
#
# Checkpoints: WORK_DIR/bn/iter_$ITERS.pth and WORK_DIR/ce/iter_$ITERS.pth; when
# one is missing, synthetic_ap.sh trains both with the same environment
# (ITERS, NUM_TRAIN, NUM_VAL, ...; VAL_INTERVAL defaults to ITERS here). The
# README figure was made with a short, affordable budget (see the README):
#   ITERS=30 NUM_VAL=20 RATIOS="0 0.3 0.6" ABLATION_IMAGES=10 \
#       bash tools/analysis_tools/readme_plot.sh work_dirs/readme_plot
#
# Environment: PYTHON, ITERS (default 300), DATA, NUM_TRAIN, NUM_VAL, SIZE,
# SEED (as synthetic_ap.sh), NUM_IMAGES (sparsity images, default 8),
# AII_IMAGES (default 32), RATIOS (default "0 0.1 0.2 0.3 0.4 0.5 0.6"),
# ABLATION_IMAGES (evaluate the ablation on the first N validation images;
# default: all),
# FIGURE (default docs/figures/channel_sparsity_synthetic.png; empty: no copy).
set -eo pipefail

main() {
  ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
  PYTHON=${PYTHON:-python}
  WORK_DIR=${1:-work_dirs/synthetic_ap}
  export ITERS=${ITERS:-300}
  export VAL_INTERVAL=${VAL_INTERVAL:-$ITERS}
  DATA=${DATA:-data/synthetic_shapes_bench}
  DATA=${DATA%/}
  export DATA PYTHON
  NUM_IMAGES=${NUM_IMAGES:-8}
  AII_IMAGES=${AII_IMAGES:-32}
  RATIOS=${RATIOS:-"0 0.1 0.2 0.3 0.4 0.5 0.6"}
  ABLATION_OPTIONS=()
  if [ -n "$ABLATION_IMAGES" ]; then
    ABLATION_OPTIONS=("test_dataloader.dataset.indices=$ABLATION_IMAGES")
  fi
  FIGURE=${FIGURE-docs/figures/channel_sparsity_synthetic.png}
  OUT="$WORK_DIR/channel_analysis"
  BN_CKPT="$WORK_DIR/bn/iter_$ITERS.pth"
  CE_CKPT="$WORK_DIR/ce/iter_$ITERS.pth"
  BENCH="$ROOT/configs/cenet/synthetic"

  if [ ! -f "$BN_CKPT" ] || [ ! -f "$CE_CKPT" ]; then
    echo "[readme_plot] training BN and CE for $ITERS iterations (synthetic_ap.sh)"
    bash "$ROOT/tools/benchmarks/synthetic_ap.sh" "$WORK_DIR"
  fi

  MODELS=("$BENCH/mask-rcnn_r50_fpn_shapes-bench.py" "$BN_CKPT"
          "$BENCH/mask-rcnn_ce-r50_fpn_shapes-bench.py" "$CE_CKPT")
  OPTIONS=("test_dataloader.dataset.data_root=$DATA/"
           "test_evaluator.ann_file=$DATA/annotations/instances_val.json")
  TOOLS="$ROOT/tools/analysis_tools"
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
