# CE-ResNet-18 on ImageNet-1k, the recipe of ce-resnet50_8xb32_in1k.py (the
# paper's appendix F). CE placement is CEResNet's default for depth 18, the
# paper's CE-ResNet-18 (Table 1: "the CE block in each residual block"): the
# stem and bn2 of every BasicBlock, all four stages.
#
#   bash tools/dist_train.sh configs/cenet/imagenet/ce-resnet18_8xb32_in1k.py 8
#   python tools/model_converters/cls2backbone.py \
#       work_dirs/ce-resnet18_8xb32_in1k/epoch_100.pth \
#       checkpoints/cenet_r18_imagenet_mmdet.pth
_base_ = './ce-resnet50_8xb32_in1k.py'

model = dict(backbone=dict(depth=18), head=dict(in_channels=512))
