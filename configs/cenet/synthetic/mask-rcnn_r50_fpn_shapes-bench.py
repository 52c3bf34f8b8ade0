# Benchmark baseline: MMDetection's BN ResNet-50 Mask R-CNN trained from
# scratch, identical to mask-rcnn_ce-r50_fpn_shapes-bench.py except for the
# backbone (plain ResNet: no CE). See tools/experiments/multi_seed_ap.py.
custom_imports = dict(imports=['cenet_mmdet'], allow_failed_imports=False)
_base_ = './mask-rcnn_ce-r50_fpn_shapes-bench.py'

model = dict(
    backbone=dict(
        _delete_=True,
        type='ResNet',
        depth=50,
        num_stages=4,
        out_indices=(0, 1, 2, 3),
        frozen_stages=-1,
        norm_cfg=dict(type='BN', requires_grad=True),
        norm_eval=False,
        style='pytorch',
        zero_init_residual=True,
        init_cfg=None))
