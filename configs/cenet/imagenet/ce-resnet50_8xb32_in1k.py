# CE-ResNet-50 on ImageNet-1k: the paper's classification recipe (appendix F,
# "ResNet Training Setting"): 8 GPUs x 32 images, 100 epochs, SGD momentum 0.9,
# weight decay 1e-4, lr 0.1, x0.1 at epochs 30, 60 and 90; CE statistics per
# GPU (plain CE and BN, not SyncCE / SyncBN); random resized crop 224 + flip,
# test: short edge 256 + centre crop 224.
#
#   bash tools/dist_train.sh configs/cenet/imagenet/ce-resnet50_8xb32_in1k.py 8
#
# Data: data/imagenet/{train,val}/ with meta/{train,val}.txt (MMPretrain's
# layout), or class sub-folders train/<class>/<image> (no meta list).
# The model, dataset, transforms and metric are cenet_mmdet.classification
# (MMEngine-native, MMPretrain's type and field names, registered in
# MMDetection's registries). The backbone of the result goes to the detection
# configs with tools/model_converters/cls2backbone.py (docs/checkpoints.md).
custom_imports = dict(imports=['cenet_mmdet'], allow_failed_imports=False)
default_scope = 'mmdet'

# ---- model ----
model = dict(
    type='ImageClassifier',
    data_preprocessor=dict(
        type='ClsDataPreprocessor',
        num_classes=1000,
        # RGB mean / std of ImageNet, in 0-255 (OpenCV loads BGR: to_rgb)
        mean=[123.675, 116.28, 103.53],
        std=[58.395, 57.12, 57.375],
        to_rgb=True),
    backbone=dict(
        type='CEResNet',
        depth=50,
        num_stages=4,
        out_indices=(3, ),
        style='pytorch',
        frozen_stages=-1,
        norm_cfg=dict(type='BN', requires_grad=True),
        # mmdet's ResNet defaults to norm_eval=True (frozen statistics, the
        # detection setting); classification trains every BN/CE statistic
        norm_eval=False,
        ce_cfg=dict(type='CE')),
    # CE placement: CEResNet's default by depth (50: stem + stages 1-3, as the
    # released resnetv1ce50; 101: stem + stages 1-2)
    neck=dict(type='GlobalAveragePooling'),
    head=dict(
        type='LinearClsHead',
        num_classes=1000,
        in_channels=2048,
        loss=dict(type='CrossEntropyLoss', loss_weight=1.0),
        topk=(1, 5)))

# ---- data ----
dataset_type = 'ImageNet'
data_root = 'data/imagenet'
train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='RandomResizedCrop', scale=224),
    dict(type='RandomFlip', prob=0.5, direction='horizontal'),
    dict(type='PackInputs'),
]
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='ResizeEdge', scale=256, edge='short'),
    dict(type='CenterCrop', crop_size=224),
    dict(type='PackInputs'),
]
train_dataloader = dict(
    batch_size=32,  # per GPU
    num_workers=5,
    persistent_workers=True,
    dataset=dict(
        type=dataset_type,
        data_root=data_root,
        split='train',
        pipeline=train_pipeline),
    sampler=dict(type='DefaultSampler', shuffle=True))
val_dataloader = dict(
    batch_size=32,
    num_workers=5,
    persistent_workers=True,
    dataset=dict(
        type=dataset_type,
        data_root=data_root,
        split='val',
        pipeline=test_pipeline),
    sampler=dict(type='DefaultSampler', shuffle=False))
val_evaluator = dict(type='Accuracy', topk=(1, 5))
test_dataloader = val_dataloader
test_evaluator = val_evaluator

# ---- schedule ----
optim_wrapper = dict(
    optimizer=dict(type='SGD', lr=0.1, momentum=0.9, weight_decay=1e-4))
param_scheduler = dict(
    type='MultiStepLR', by_epoch=True, milestones=[30, 60, 90], gamma=0.1)
train_cfg = dict(by_epoch=True, max_epochs=100, val_interval=1)
val_cfg = dict()
test_cfg = dict()
# the lr above is for 8 x 32 = 256 images per step (--auto-scale-lr)
auto_scale_lr = dict(enable=False, base_batch_size=256)

# ---- runtime ----
default_hooks = dict(
    timer=dict(type='IterTimerHook'),
    logger=dict(type='LoggerHook', interval=100),
    param_scheduler=dict(type='ParamSchedulerHook'),
    checkpoint=dict(type='CheckpointHook', interval=1, max_keep_ckpts=3),
    sampler_seed=dict(type='DistSamplerSeedHook'))
# BN/CE running statistics are per GPU (each GPU updates them from its own
# batch; DDP broadcasts rank 0's before every training step): average them
# over the GPUs at the end of each epoch, before the checkpoint is saved and
# the model validated, so that every GPU validates the saved model.
# RandomStateHook: every rank's random states travel with the checkpoints, so
# that --resume continues exactly (cenet_mmdet/engine/random_state.py).
custom_hooks = [dict(type='SyncBuffersHook'), dict(type='RandomStateHook')]
env_cfg = dict(
    cudnn_benchmark=False,
    mp_cfg=dict(mp_start_method='fork', opencv_num_threads=0),
    dist_cfg=dict(backend='nccl'))
vis_backends = [dict(type='LocalVisBackend')]
visualizer = dict(type='Visualizer', vis_backends=vis_backends)
log_processor = dict(window_size=10, by_epoch=True)
log_level = 'INFO'
load_from = None
resume = False
randomness = dict(seed=None, deterministic=False)
