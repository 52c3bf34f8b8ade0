# Mask R-CNN, GN+SyncCE-ResNet-50-FPN, GN in backbone, neck and heads
# ("gn-all"), 2x schedule, COCO. The paper reports no detection result with
# GN; its GN+CE-ResNet-50 ImageNet model (Table 3: 76.2 top-1) was not released.
#
# Everything but the backbone is MMDetection's GN recipe,
# mmdet::gn/mask-rcnn_r50-contrib_fpn_gn-all_2x_coco.py: GN (32 groups,
# trained gamma/beta) in the FPN, a Shared4Conv1FC box head and the mask
# head; 8 GPUs x 2 images, 24 epochs, SGD lr 0.02, 500-iteration warm-up,
# steps at epochs 16 and 22; torchvision-style input normalization (RGB,
# ImageNet mean/std: the normalization of configs/cenet/imagenet/, which is
# why the "contrib" variant is the base and not the Detectron one with its
# BGR, std-1 input).
#
# The backbone: CEResNet with GN everywhere and GN+CE at the CE positions
# (stem and the last norm of every block of stages 1-3: gn1 and
# layerX.Y.gn3, the CE block as child .ce). The GN gamma/beta are trained,
# as in MMDetection's gn-all configs; the CE statistics are computed from the
# batch over all GPUs (SyncCE: 16 images instead of 2 per GPU) and updated
# (norm_eval=False); the AII gate F and lambda stay at their ImageNet values
# (frozen_gate=True), as in the paper's SyncCE detection setting.
# frozen_stages=1 (stem and stage 1 fixed) is inherited.
#
# The backbone weights: no GN+CE-ResNet-50 was released. Pretrain one with
# this project and extract its backbone:
#   bash tools/dist_train.sh configs/cenet/imagenet/ce-resnet50-gn_8xb32_in1k.py 8
#   python tools/model_converters/cls2backbone.py \
#       work_dirs/ce-resnet50-gn_8xb32_in1k/epoch_100.pth \
#       checkpoints/cenet_r50-gn_imagenet_mmdet.pth
# (or load the classifier checkpoint itself: --cfg-options
#  model.backbone.init_cfg.checkpoint=<epoch_100.pth>
#  model.backbone.init_cfg.prefix=backbone.).
custom_imports = dict(imports=['cenet_mmdet'], allow_failed_imports=False)
_base_ = 'mmdet::gn/mask-rcnn_r50-contrib_fpn_gn-all_2x_coco.py'

model = dict(
    backbone=dict(
        type='CEResNet',
        norm_cfg=dict(type='GN', num_groups=32, requires_grad=True),
        norm_eval=False,
        ce_cfg=dict(type='SyncCE', frozen_gate=True),
        init_cfg=dict(
            type='Pretrained',
            checkpoint='checkpoints/cenet_r50-gn_imagenet_mmdet.pth')))

# Every rank's random states travel with the checkpoints, so that a killed run
# resumed with --resume ends at exactly the weights of an uninterrupted one
# (cenet_mmdet/engine/random_state.py).
custom_hooks = [dict(type='RandomStateHook')]
