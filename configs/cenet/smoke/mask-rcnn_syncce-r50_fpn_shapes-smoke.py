# CPU smoke run of the SyncCE Mask R-CNN (../mask-rcnn_syncce-r50_fpn_2x_coco.py)
# on synthetic shapes: a few iterations, tiny images, no pretrained weights.
# It checks that training, checkpointing, resuming and bbox/segm evaluation run
# end to end (AP after a few iterations is near zero). Run from the repo root:
#
#   python tools/misc/make_synthetic_coco.py data/synthetic_shapes \
#       --train 64 --val 8 --size 128 --seed 0
#   bash tools/dist_train.sh \
#       configs/cenet/smoke/mask-rcnn_syncce-r50_fpn_shapes-smoke.py 2
#
# Without CUDA, tools/train.py runs the processes on the gloo backend
# (cenet_mmdet/engine/cpu_dist.py). Relative paths resolve from the current
# directory.
custom_imports = dict(imports=['cenet_mmdet'], allow_failed_imports=False)
_base_ = '../mask-rcnn_syncce-r50_fpn_2x_coco.py'

data_root = 'data/synthetic_shapes/'
classes = ('circle', 'square', 'triangle')
metainfo = dict(
    classes=classes, palette=[(220, 20, 60), (0, 128, 0), (0, 0, 192)])
image_size = 128

model = dict(
    backbone=dict(init_cfg=None),  # from scratch: no ImageNet checkpoint
    roi_head=dict(
        bbox_head=dict(num_classes=len(classes)),
        mask_head=dict(num_classes=len(classes))),
    # fewer sampled RoIs (MMDetection: 512) keep a CPU iteration short; the
    # mask head runs on every positive RoI
    train_cfg=dict(rcnn=dict(sampler=dict(num=128))),
    # keep low-scoring detections so that a few-iteration model is evaluated;
    # at most 20 per image (an image holds at most 5 shapes by default), which
    # bounds the mask head's work at test time
    test_cfg=dict(
        rpn=dict(nms_pre=300, max_per_img=300),
        rcnn=dict(score_thr=0.0, max_per_img=20)))

train_pipeline = [
    dict(type='LoadImageFromFile', backend_args=None),
    dict(type='LoadAnnotations', with_bbox=True, with_mask=True),
    dict(type='Resize', scale=(image_size, image_size), keep_ratio=True),
    dict(type='RandomFlip', prob=0.5),
    dict(type='PackDetInputs')
]
test_pipeline = [
    dict(type='LoadImageFromFile', backend_args=None),
    dict(type='Resize', scale=(image_size, image_size), keep_ratio=True),
    dict(type='LoadAnnotations', with_bbox=True, with_mask=True),
    dict(
        type='PackDetInputs',
        meta_keys=('img_id', 'img_path', 'ori_shape', 'img_shape',
                   'scale_factor'))
]
train_dataloader = dict(
    batch_size=1,
    num_workers=0,
    persistent_workers=False,
    dataset=dict(
        data_root=data_root,
        metainfo=metainfo,
        ann_file='annotations/instances_train.json',
        data_prefix=dict(img='train/'),
        pipeline=train_pipeline))
val_dataloader = dict(
    batch_size=1,
    num_workers=0,
    persistent_workers=False,
    dataset=dict(
        data_root=data_root,
        metainfo=metainfo,
        ann_file='annotations/instances_val.json',
        data_prefix=dict(img='val/'),
        pipeline=test_pipeline))
test_dataloader = val_dataloader
val_evaluator = dict(ann_file=data_root + 'annotations/instances_val.json')
test_evaluator = val_evaluator

# A few iterations; lr 0.02 (16 images) diverges at this batch size, so a small
# lr with gradient clipping and a short warm-up.
max_iters = 4
train_cfg = dict(
    _delete_=True,
    type='IterBasedTrainLoop',
    max_iters=max_iters,
    val_interval=max_iters)
param_scheduler = [
    dict(type='LinearLR', start_factor=0.1, by_epoch=False, begin=0, end=2)
]
optim_wrapper = dict(
    optimizer=dict(lr=0.0025), clip_grad=dict(max_norm=35, norm_type=2))
default_hooks = dict(
    logger=dict(interval=1, log_metric_by_epoch=False),
    checkpoint=dict(by_epoch=False, interval=max_iters))
log_processor = dict(by_epoch=False)
randomness = dict(seed=0)
