"""Test-only hooks for the SyncCE smoke run of tests/test_tools/e2e_run.py
(shared by test_e2e_cpu.py and test_exact_resume.py).

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


@HOOKS.register_module()
class KillRankHook(Hook):
    """SIGKILL rank ``rank`` right after training iteration ``after_iter``
    (1-based), when the environment variable ``CENET_KILL`` is ``1``. The time
    of the kill goes to ``<work_dir>/killed_at``."""

    def __init__(self, after_iter: int, rank: int = 1) -> None:
        self.after_iter, self.rank = after_iter, rank

    def after_train_iter(self, runner, batch_idx, data_batch=None,
                         outputs=None) -> None:
        import os
        import signal
        import time
        if (os.environ.get('CENET_KILL') == '1' and get_rank() == self.rank
                and runner.iter + 1 == self.after_iter):
            with open(osp.join(runner.work_dir, 'killed_at'), 'w') as f:
                f.write(repr(time.time()))
            os.kill(os.getpid(), signal.SIGKILL)
