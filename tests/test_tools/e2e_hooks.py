"""Test-only hook for tests/test_tools/test_e2e_cpu.py.

``DumpNormBuffersHook`` saves, after training, every buffer of the backbone and
the class name of every backbone module to
``<work_dir>/norm_buffers_rank<rank>.pth``, so that the buffers of the workers
of a distributed run can be compared.
"""
import os.path as osp

import torch
from mmengine.dist import get_rank
from mmengine.hooks import Hook
from mmengine.model import is_model_wrapper
from mmengine.registry import HOOKS


@HOOKS.register_module()
class DumpNormBuffersHook(Hook):
    """Dump the backbone's buffers of each rank at the end of training."""

    def after_train(self, runner) -> None:
        model = runner.model.module if is_model_wrapper(runner.model) \
            else runner.model
        backbone = model.backbone
        torch.save(
            dict(buffers={name: buf.detach().cpu().clone()
                          for name, buf in backbone.named_buffers()},
                 types={name: type(module).__name__
                        for name, module in backbone.named_modules()},
                 iter=runner.iter),
            osp.join(runner.work_dir, f'norm_buffers_rank{get_rank()}.pth'))
