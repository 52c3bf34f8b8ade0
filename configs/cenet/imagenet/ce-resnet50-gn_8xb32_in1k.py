# GN+CE-ResNet-50 on ImageNet-1k (the paper's Table 3, "GN" column: GN
# baseline 75.6, GN+CE 76.2 top-1): the recipe of ce-resnet50_8xb32_in1k.py
# (appendix F: 8 GPUs x 32 images, 100 epochs, SGD lr 0.1, x0.1 at epochs 30,
# 60, 90) with GN (32 groups) instead of BN in every norm of the backbone, and
# CE stacked after GN at the CE positions of the released layout (stem + every
# block of stages 1-3: gn1 and layerX.Y.gn3, 14 CE layers). Only the norm
# differs from the BN config.
#
# GN computes per image and has no running statistics; the CE blocks do
# (running whitening and scale): they are trained (norm_eval=False, inherited;
# mmdet's GN ResNets do not rely on norm_eval, which acts on BN only, but CE
# layers follow it), per GPU (plain CE, not SyncCE), and averaged over the
# GPUs at the end of every epoch (SyncBuffersHook, inherited).
#
#   bash tools/dist_train.sh configs/cenet/imagenet/ce-resnet50-gn_8xb32_in1k.py 8
#   python tools/model_converters/cls2backbone.py \
#       work_dirs/ce-resnet50-gn_8xb32_in1k/epoch_100.pth \
#       checkpoints/cenet_r50-gn_imagenet_mmdet.pth
#
# checkpoints/cenet_r50-gn_imagenet_mmdet.pth is what
# configs/cenet/mask-rcnn_syncce-r50_fpn_gn-all_2x_coco.py loads.
custom_imports = dict(imports=['cenet_mmdet'], allow_failed_imports=False)
_base_ = './ce-resnet50_8xb32_in1k.py'

model = dict(
    backbone=dict(norm_cfg=dict(type='GN', num_groups=32, requires_grad=True)))
