"""Tiny Mask R-CNN configs (ResNet-50 layout with 8 base channels) on the
synthetic shapes set, for fast tests of the channel analysis tools."""
import os.path as osp

REPO = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
CE_SMOKE = osp.join(REPO, 'configs', 'cenet', 'smoke',
                    'mask-rcnn_ce-r50_fpn_shapes-smoke.py')

#: backbone settings; stage widths 32, 64, 128, 256 (expansion 4)
BACKBONES = {
    'ce': "dict(type='CEResNet', depth=50, base_channels=8, frozen_stages=-1, "
          "norm_cfg=dict(type='BN', requires_grad=True), norm_eval=False, "
          "zero_init_residual=False, ce_cfg=dict(_delete_=True, type='CE'), "
          "init_cfg=None)",
    'bn': "dict(_delete_=True, type='ResNet', depth=50, base_channels=8, "
          "num_stages=4, out_indices=(0, 1, 2, 3), frozen_stages=-1, "
          "norm_cfg=dict(type='BN', requires_grad=True), norm_eval=False, "
          "style='pytorch', zero_init_residual=False, init_cfg=None)",
}


def write_tiny_config(path: str, data_root: str, kind: str = 'ce',
                      test_split: str = 'val', max_iters: int = 4) -> str:
    """Write a tiny Mask R-CNN config with a ``kind`` ('ce' or 'bn')
    backbone on the synthetic set at ``data_root``; the test set is
    ``test_split``. Returns ``path``."""
    data_root = data_root.rstrip('/') + '/'
    text = f"""
_base_ = {CE_SMOKE!r}
custom_imports = dict(imports=['cenet_mmdet'], allow_failed_imports=False)
data_root = {data_root!r}
model = dict(
    backbone={BACKBONES[kind]},
    neck=dict(in_channels=[32, 64, 128, 256], out_channels=16),
    rpn_head=dict(in_channels=16, feat_channels=16),
    roi_head=dict(
        bbox_roi_extractor=dict(out_channels=16),
        bbox_head=dict(in_channels=16, fc_out_channels=32),
        mask_roi_extractor=dict(out_channels=16),
        mask_head=dict(in_channels=16, conv_out_channels=16)),
    train_cfg=dict(rcnn=dict(sampler=dict(num=32))))
train_dataloader = dict(batch_size=4, dataset=dict(data_root=data_root))
test_dataloader = dict(dataset=dict(
    data_root=data_root, ann_file='annotations/instances_{test_split}.json',
    data_prefix=dict(img='{test_split}/')))
val_dataloader = test_dataloader
test_evaluator = dict(ann_file=data_root + 'annotations/instances_{test_split}.json')
val_evaluator = test_evaluator
train_cfg = dict(max_iters={max_iters}, val_interval={max_iters})
optim_wrapper = dict(optimizer=dict(lr=0.02))
param_scheduler = []
default_hooks = dict(logger=dict(interval=10),
                     checkpoint=dict(interval={max_iters}))
"""
    with open(path, 'w') as f:
        f.write(text)
    return path
