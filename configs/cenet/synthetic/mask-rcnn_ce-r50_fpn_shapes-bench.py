# Benchmark: CE-ResNet-50 Mask R-CNN trained from scratch on the hard synthetic
# shapes set (6 classes, up to 7 shapes with occlusion, small objects, textured
# background; see tools/benchmarks/synthetic_ap.sh, which generates the data
# and compares with mask-rcnn_r50_fpn_shapes-bench.py at the same budget).
#
# From scratch, so every norm layer is trained (BN and CE statistics updated,
# gamma/beta, lambda and the AII gate learned), no stage is frozen and the
# residual branches are not zero-initialized. One
# process, 4 images per iteration, lr 0.005 with gradient clipping (lr 0.02
# diverges at this batch size), 50-iteration warm-up, a step at 5/6 of the
# run, evaluation every 90 iterations for the AP curve. 128 sampled RoIs per
# image (inherited from the smoke config; MMDetection: 512) keep an iteration
# short; the test settings are MMDetection's.
custom_imports = dict(imports=['cenet_mmdet'], allow_failed_imports=False)
_base_ = '../smoke/mask-rcnn_syncce-r50_fpn_shapes-smoke.py'

data_root = 'data/synthetic_shapes_hard/'
classes = ('circle', 'square', 'triangle', 'hexagon', 'star', 'cross')
metainfo = dict(
    classes=classes,
    palette=[(220, 20, 60), (0, 128, 0), (0, 0, 192), (255, 165, 0),
             (128, 0, 128), (0, 160, 160)])

model = dict(
    backbone=dict(
        type='CEResNet',
        frozen_stages=-1,
        # as torchvision (and the released CE-ResNet ImageNet training). With
        # a CE block after bn3, the AII branch divides by the batch's own
        # scale, so a small nonzero bn3 gamma is scaled back up: zero-init
        # does not keep the residual branch small. The BN baseline uses the
        # same init for a fair comparison.
        zero_init_residual=False,
        norm_cfg=dict(type='BN', requires_grad=True),
        norm_eval=False,
        ce_cfg=dict(_delete_=True, type='CE'),
        init_cfg=None),
    roi_head=dict(
        bbox_head=dict(num_classes=len(classes)),
        mask_head=dict(num_classes=len(classes))),
    # MMDetection's test settings (the smoke config trims them)
    test_cfg=dict(
        rpn=dict(nms_pre=1000, max_per_img=1000),
        rcnn=dict(score_thr=0.05, max_per_img=100)))

train_dataloader = dict(
    batch_size=4,
    dataset=dict(data_root=data_root, metainfo=metainfo))
val_dataloader = dict(dataset=dict(data_root=data_root, metainfo=metainfo))
test_dataloader = val_dataloader
val_evaluator = dict(ann_file=data_root + 'annotations/instances_val.json')
test_evaluator = val_evaluator

max_iters = 360
train_cfg = dict(max_iters=max_iters, val_interval=90)
param_scheduler = [
    dict(type='LinearLR', start_factor=0.001, by_epoch=False, begin=0, end=50),
    dict(
        type='MultiStepLR',
        by_epoch=False,
        begin=0,
        end=max_iters,
        milestones=[max_iters * 5 // 6],
        gamma=0.1)
]
optim_wrapper = dict(optimizer=dict(lr=0.005))
default_hooks = dict(
    logger=dict(interval=10),
    checkpoint=dict(interval=max_iters, max_keep_ckpts=1))
