# Mask R-CNN, CE-ResNeXt-101 (32x4d)-FPN, 2x schedule, COCO: MMDetection's
# X-101-32x4d config with CE where CE-ResNet-50 has it (the paper places no CE
# in a ResNeXt): after the stem norm and bn3 of every block of stages 1-3, the
# paper's "CE" setting (BN and CE frozen, as in mask-rcnn_ce-r50_fpn_2x_coco.py).
#
# No ImageNet CE-ResNeXt was released: pretrain one with this project and
# extract its backbone (docs/imagenet.md):
#   bash tools/dist_train.sh configs/cenet/imagenet/ce-resnext101-32x4d_8xb32_in1k.py 8
#   python tools/model_converters/cls2backbone.py \
#       work_dirs/ce-resnext101-32x4d_8xb32_in1k/epoch_100.pth \
#       checkpoints/cenet_x101-32x4d_imagenet_mmdet.pth
custom_imports = dict(imports=['cenet_mmdet'], allow_failed_imports=False)
_base_ = 'mmdet::mask_rcnn/mask-rcnn_x101-32x4d_fpn_2x_coco.py'

model = dict(
    backbone=dict(
        type='CEResNeXt',
        norm_cfg=dict(type='BN', requires_grad=False),
        ce_cfg=dict(type='CE'),
        init_cfg=dict(
            type='Pretrained',
            checkpoint='checkpoints/cenet_x101-32x4d_imagenet_mmdet.pth')))

custom_hooks = [dict(type='RandomStateHook')]
