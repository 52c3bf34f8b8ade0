# Mask R-CNN, CE-ResNet-50-FPN, 2x schedule, COCO: the paper's "SyncCE" setting.
#
# BN and CE statistics are computed across all GPUs (SyncBN + SyncCE) and
# updated, gamma/beta are trained, the AII gate F and lambda stay at their
# ImageNet values (frozen_gate=True). frozen_stages=1 (stem and stage 1 fixed)
# is inherited. Everything else, including the schedule (8 GPUs x 2 images,
# 24 epochs, SGD lr 0.02, steps at epochs 16 and 22), is inherited from
# mmdet::mask_rcnn/mask-rcnn_r50_fpn_2x_coco.py.
#
# The backbone weights are the released ImageNet CE-ResNet-50, converted with
#   python tools/model_converters/cenet2mmdet.py <released.pth> \
#       checkpoints/cenet_r50_imagenet_mmdet.pth
custom_imports = dict(imports=['cenet_mmdet'], allow_failed_imports=False)
_base_ = 'mmdet::mask_rcnn/mask-rcnn_r50_fpn_2x_coco.py'

model = dict(
    backbone=dict(
        type='CEResNet',
        norm_cfg=dict(type='SyncBN', requires_grad=True),
        norm_eval=False,
        ce_cfg=dict(type='SyncCE', frozen_gate=True),
        init_cfg=dict(
            type='Pretrained',
            checkpoint='checkpoints/cenet_r50_imagenet_mmdet.pth')))

# Every rank's random states travel with the checkpoints, so that a killed run
# resumed with --resume ends at exactly the weights of an uninterrupted one
# (cenet_mmdet/engine/random_state.py).
custom_hooks = [dict(type='RandomStateHook')]
