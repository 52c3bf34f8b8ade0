# Mask R-CNN, CE-ResNet-101-FPN, 2x schedule, COCO: the paper's "CE" setting
# (see mask-rcnn_ce-r50_fpn_2x_coco.py). CEResNet-101 places CE in stages 1-2
# by default (stage_with_ce=(True, True, False, False)).
#
# No ImageNet CE-ResNet-101 was released: pretrain one with this project
# (docs/imagenet.md) and extract its backbone:
#   bash tools/dist_train.sh configs/cenet/imagenet/ce-resnet101_8xb32_in1k.py 8
#   python tools/model_converters/cls2backbone.py \
#       work_dirs/ce-resnet101_8xb32_in1k/epoch_100.pth \
#       checkpoints/cenet_r101_imagenet_mmdet.pth
# (or load the classifier checkpoint itself: --cfg-options
#  model.backbone.init_cfg.checkpoint=<epoch_100.pth>
#  model.backbone.init_cfg.prefix=backbone.).
# A CE-ResNet-101 trained with the authors' code (released layout) converts
# with tools/model_converters/cenet2mmdet.py instead.
custom_imports = dict(imports=['cenet_mmdet'], allow_failed_imports=False)
_base_ = 'mmdet::mask_rcnn/mask-rcnn_r101_fpn_2x_coco.py'

model = dict(
    backbone=dict(
        type='CEResNet',
        norm_cfg=dict(type='BN', requires_grad=False),
        ce_cfg=dict(type='CE'),
        init_cfg=dict(
            type='Pretrained',
            checkpoint='checkpoints/cenet_r101_imagenet_mmdet.pth')))

# Every rank's random states travel with the checkpoints, so that a killed run
# resumed with --resume ends at exactly the weights of an uninterrupted one
# (cenet_mmdet/engine/random_state.py).
custom_hooks = [dict(type='RandomStateHook')]
