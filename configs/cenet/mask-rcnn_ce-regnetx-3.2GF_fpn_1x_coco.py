# Mask R-CNN, CE-RegNetX-3.2GF-FPN, 1x schedule, COCO: MMDetection's RegNetX
# config with CE where CE-ResNet-50 has it (the paper places no CE in a
# RegNet): after the stem norm and bn3 of every bottleneck of stages 1-3, the
# paper's "CE" setting (BN and CE frozen).
#
# No ImageNet CE-RegNet was released: pretrain one (a CE-ResNet ImageNet config
# with model.backbone=dict(type='CERegNet', arch='regnetx_3.2gf', ...)) and
# extract its backbone with tools/model_converters/cls2backbone.py.
custom_imports = dict(imports=['cenet_mmdet'], allow_failed_imports=False)
_base_ = 'mmdet::regnet/mask-rcnn_regnetx-3.2GF_fpn_1x_coco.py'

model = dict(
    backbone=dict(
        type='CERegNet',
        norm_cfg=dict(type='BN', requires_grad=False),
        ce_cfg=dict(type='CE'),
        init_cfg=dict(
            type='Pretrained',
            checkpoint='checkpoints/cenet_regnetx-3.2gf_imagenet_mmdet.pth')))

custom_hooks = [dict(type='RandomStateHook')]
