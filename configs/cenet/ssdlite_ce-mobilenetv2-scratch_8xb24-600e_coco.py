# SSDLite, CE-MobileNetV2, trained from scratch on COCO (600 epochs, 8 GPUs x 24):
# MMDetection's SSDLite config with the paper's CE-MobileNetV2 placement, CE
# after the norm of every 3x3 depthwise convolution, before its ReLU6. The CE
# layers take the backbone BN's options (eps 1e-3, momentum 0.03).
custom_imports = dict(imports=['cenet_mmdet'], allow_failed_imports=False)
_base_ = 'mmdet::ssd/ssdlite_mobilenetv2-scratch_8xb24-600e_coco.py'

model = dict(backbone=dict(type='CEMobileNetV2', ce_cfg=dict(type='CE')))

custom_hooks = [
    dict(type='NumClassCheckHook'),
    dict(type='CheckInvalidLossHook', interval=50, priority='VERY_LOW'),
    dict(type='RandomStateHook'),
]
