# CE-MobileNetV2 on ImageNet-1k, the paper's recipe (appendix F, "MobileNet V2
# Training Setting"): 8 GPUs x 32 images, 150 epochs, SGD momentum 0.9, weight
# decay 4e-5, lr 0.05 with a cosine schedule; CE after the norm of every 3x3
# depthwise convolution, before its ReLU6 (the paper's placement; 74.6% top-1
# in its Table 2).
#
#   bash tools/dist_train.sh configs/cenet/imagenet/ce-mobilenetv2_8xb32_in1k.py 8
#   python tools/model_converters/cls2backbone.py \
#       work_dirs/ce-mobilenetv2_8xb32_in1k/epoch_150.pth \
#       checkpoints/cenet_mobilenetv2_imagenet_mmdet.pth
_base_ = './ce-resnet50_8xb32_in1k.py'

model = dict(
    backbone=dict(_delete_=True, type='CEMobileNetV2', widen_factor=1.0,
                  out_indices=(7, ), norm_cfg=dict(type='BN', requires_grad=True),
                  norm_eval=False, ce_cfg=dict(type='CE')),
    head=dict(in_channels=1280))

optim_wrapper = dict(
    optimizer=dict(type='SGD', lr=0.05, momentum=0.9, weight_decay=4e-5))
param_scheduler = dict(
    _delete_=True, type='CosineAnnealingLR', by_epoch=True, T_max=150,
    eta_min=0)
train_cfg = dict(by_epoch=True, max_epochs=150, val_interval=1)
