# CE-ResNet-101 on ImageNet-1k, the recipe of ce-resnet50_8xb32_in1k.py (the
# paper's appendix F): only the depth differs. CE placement is CEResNet's
# default for depth 101, stem + stages 1-2 (our reading of the paper's "first
# seven residual blocks"), the placement the R-101 detection configs expect.
#
#   bash tools/dist_train.sh configs/cenet/imagenet/ce-resnet101_8xb32_in1k.py 8
#   python tools/model_converters/cls2backbone.py \
#       work_dirs/ce-resnet101_8xb32_in1k/epoch_100.pth \
#       checkpoints/cenet_r101_imagenet_mmdet.pth
#
# checkpoints/cenet_r101_imagenet_mmdet.pth is what
# configs/cenet/mask-rcnn_{ce,syncce}-r101_fpn_2x_coco.py load.
_base_ = './ce-resnet50_8xb32_in1k.py'

model = dict(backbone=dict(depth=101))
