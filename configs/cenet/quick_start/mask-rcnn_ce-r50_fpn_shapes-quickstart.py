# The 5-minute CPU quick start (bash tools/quick_start.sh): a CE-ResNet-50
# Mask R-CNN trained from scratch for a few iterations on the synthetic shapes
# set, then tested by tools/test.py. Everything but the length of the run is
# the synthetic benchmark's (6 classes; every BN and CE layer trained from its
# initial values, zero_init_residual, no frozen stage; lr 0.005 with gradient
# clipping): a short warm-up, 2 images per iteration, no validation during
# training (the quick start tests once, at the end), and the smoke configs'
# score threshold 0, so that a briefly trained model has detections to
# evaluate (with none, MMDetection's CocoMetric reports no AP).
# tools/quick_start.sh passes data_root (every data path moves with it), the
# number of iterations, the batch size and the logger interval (its progress
# line reads MMEngine's log lines).
custom_imports = dict(imports=['cenet_mmdet'], allow_failed_imports=False)
_base_ = '../synthetic/mask-rcnn_ce-r50_fpn_shapes-bench.py'

model = dict(test_cfg=dict(rcnn=dict(score_thr=0.0)))
train_dataloader = dict(batch_size=2)

max_iters = 60
# val_begin beyond the last iteration: no validation inside training
train_cfg = dict(
    max_iters=max_iters, val_interval=max_iters, val_begin=max_iters + 1)
param_scheduler = [
    dict(type='LinearLR', start_factor=0.1, by_epoch=False, begin=0, end=10)
]
# the checkpoint is only tested: its weights, without the optimizer state
default_hooks = dict(
    logger=dict(interval=5),
    checkpoint=dict(interval=max_iters, max_keep_ckpts=1, save_optimizer=False))
