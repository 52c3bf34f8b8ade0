# Benchmark: CE-ResNet-50 Mask R-CNN trained from scratch on a synthetic
# shapes set (6 classes, 2-5 shapes with occlusion, colour not tied to class,
# noisy background; tools/experiments/multi_seed_ap.py generates the data and
# compares with mask-rcnn_r50_fpn_shapes-bench.py at the same budget over
# several seeds).
#
# From scratch, so every norm layer is trained (BN and CE statistics updated,
# gamma/beta, lambda and the AII gate learned) and no stage is frozen. One
# process, 4 images per iteration, lr 0.005 with gradient clipping (lr 0.02
# diverges at this batch size), 50-iteration warm-up, a step at 5/6 of the
# run, one evaluation at the end. Two cuts keep an iteration short (3.3 s
# instead of 7.5 s for BN at 1 thread; the mask head dominated): 32 sampled
# RoIs per image (MMDetection: 512; an image holds at most 5 shapes, so the
# 8 positives cover them) and 7x7 mask RoIs with 14x14 mask targets
# (MMDetection: 14x14 and 28x28; a shape is 15-60 px at 128 px). Test: MMDetection's score threshold (0.05) and RPN
# pre-NMS count (1000), with 300 proposals (MMDetection: 1000) and at most 20
# detections per image (MMDetection: 100; an image holds at most 5 shapes):
# the mask head runs on every kept detection, and these bounds cut the
# evaluation of 300 images about fourfold.
#
# zero_init_residual=True (MMDetection's ResNet default). Without it the
# first step's gradient norm is about 1.5e3 for BN and CE alike (50 for BN
# and 73 for CE with it; tools/analysis_tools/first_step_grad_norms.py), so
# clipping to 35 scales every head's update down about 45-fold, and the RoI
# head stalled (a BN run: loss_cls and loss_bbox flat from iteration 80 to
# 130, box AP 0.2 at iteration 100). In a CE bottleneck the zero bn3 gamma
# keeps the branch at zero only until the first update: the AII branch
# divides by the batch's own scale, so its half of the output is back at unit
# scale once gamma exceeds about sqrt(ce_eps) (docs/evidence.md, "CE from
# scratch and zero_init_residual").
custom_imports = dict(imports=['cenet_mmdet'], allow_failed_imports=False)
_base_ = '../smoke/mask-rcnn_syncce-r50_fpn_shapes-smoke.py'

data_root = 'data/synthetic_shapes_multi_seed/'
classes = ('circle', 'square', 'triangle', 'hexagon', 'star', 'cross')
metainfo = dict(
    classes=classes,
    palette=[(220, 20, 60), (0, 128, 0), (0, 0, 192), (255, 165, 0),
             (128, 0, 128), (0, 160, 160)])

model = dict(
    backbone=dict(
        type='CEResNet',
        frozen_stages=-1,
        zero_init_residual=True,
        norm_cfg=dict(type='BN', requires_grad=True),
        norm_eval=False,
        ce_cfg=dict(_delete_=True, type='CE'),
        init_cfg=None),
    roi_head=dict(
        bbox_head=dict(num_classes=len(classes)),
        # 7x7 mask RoI features upsampled to 14x14 masks (MMDetection: 14x14
        # to 28x28): the mask head's four 3x3 convs cost a quarter
        mask_roi_extractor=dict(roi_layer=dict(output_size=7)),
        mask_head=dict(roi_feat_size=7, num_classes=len(classes))),
    train_cfg=dict(rcnn=dict(sampler=dict(num=32), mask_size=14)),
    test_cfg=dict(
        rpn=dict(nms_pre=1000, max_per_img=300),
        rcnn=dict(score_thr=0.05, max_per_img=20)))

train_dataloader = dict(
    batch_size=4,
    dataset=dict(data_root=data_root, metainfo=metainfo))
val_dataloader = dict(dataset=dict(data_root=data_root, metainfo=metainfo))
test_dataloader = val_dataloader
val_evaluator = dict(ann_file=data_root + 'annotations/instances_val.json')
test_evaluator = val_evaluator

max_iters = 300
train_cfg = dict(max_iters=max_iters, val_interval=max_iters)
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
