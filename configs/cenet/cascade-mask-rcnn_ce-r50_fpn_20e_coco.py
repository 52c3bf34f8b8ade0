# Cascade Mask R-CNN, CE-ResNet-50-FPN, 20e schedule, COCO, in the paper's
# "CE" setting (the backbone of mask-rcnn_ce-r50_fpn_2x_coco.py). The paper
# reports no Cascade Mask R-CNN result.
#
# MMDetection has no 2x Cascade Mask R-CNN config; its longest single-scale
# schedule, 20e, is the one used here (the paper's Mask R-CNN uses 2x).
# BN and CE are frozen: running statistics, gamma/beta, the AII gate F and
# lambda are fixed at their ImageNet values (norm_cfg requires_grad=False; the CE
# layers inherit it; norm_eval=True and frozen_stages=1 are inherited from
# MMDetection's BN baseline). Only the backbone differs from
# mmdet::cascade_rcnn/cascade-mask-rcnn_r50_fpn_20e_coco.py: 8 GPUs x 2
# images, 20 epochs, SGD lr 0.02, steps at epochs 16 and 19 are inherited.
#
# The backbone weights are the released ImageNet CE-ResNet-50, converted with
#   python tools/model_converters/cenet2mmdet.py <released.pth> \
#       checkpoints/cenet_r50_imagenet_mmdet.pth
# (tools/train.py stops with this command if the file is missing).
custom_imports = dict(imports=['cenet_mmdet'], allow_failed_imports=False)
_base_ = 'mmdet::cascade_rcnn/cascade-mask-rcnn_r50_fpn_20e_coco.py'

model = dict(
    backbone=dict(
        type='CEResNet',
        norm_cfg=dict(type='BN', requires_grad=False),
        ce_cfg=dict(type='CE'),
        init_cfg=dict(
            type='Pretrained',
            checkpoint='checkpoints/cenet_r50_imagenet_mmdet.pth')))

# Every rank's random states travel with the checkpoints, so that a killed run
# resumed with --resume ends at exactly the weights of an uninterrupted one
# (cenet_mmdet/engine/random_state.py).
custom_hooks = [dict(type='RandomStateHook')]
