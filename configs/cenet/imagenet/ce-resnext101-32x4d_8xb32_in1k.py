# CE-ResNeXt-101 (32x4d) on ImageNet-1k, the recipe of ce-resnet50_8xb32_in1k.py,
# with CE where CE-ResNet-50 has it (stem + bn3 of stages 1-3; the paper places
# no CE in a ResNeXt). Its backbone is what
# configs/cenet/mask-rcnn_ce-x101-32x4d_fpn_2x_coco.py loads:
#
#   bash tools/dist_train.sh configs/cenet/imagenet/ce-resnext101-32x4d_8xb32_in1k.py 8
#   python tools/model_converters/cls2backbone.py \
#       work_dirs/ce-resnext101-32x4d_8xb32_in1k/epoch_100.pth \
#       checkpoints/cenet_x101-32x4d_imagenet_mmdet.pth
_base_ = './ce-resnet50_8xb32_in1k.py'

model = dict(
    backbone=dict(_delete_=True, type='CEResNeXt', depth=101, groups=32,
                  base_width=4, out_indices=(3, ), style='pytorch',
                  norm_cfg=dict(type='BN', requires_grad=True),
                  norm_eval=False, ce_cfg=dict(type='CE')))
