# CPU smoke run of the CE Mask R-CNN (../mask-rcnn_ce-r50_fpn_2x_coco.py) on
# synthetic shapes; data, schedule and evaluation as in
# mask-rcnn_syncce-r50_fpn_shapes-smoke.py, the backbone as in the CE config
# (BN and CE frozen). With init_cfg=None the frozen statistics are the initial
# ones; pass load_from=<checkpoint> to start from given weights. Run:
#
#   python tools/train.py configs/cenet/smoke/mask-rcnn_ce-r50_fpn_shapes-smoke.py
custom_imports = dict(imports=['cenet_mmdet'], allow_failed_imports=False)
_base_ = './mask-rcnn_syncce-r50_fpn_shapes-smoke.py'

model = dict(
    backbone=dict(
        norm_cfg=dict(type='BN', requires_grad=False),
        norm_eval=True,
        ce_cfg=dict(_delete_=True, type='CE')))
