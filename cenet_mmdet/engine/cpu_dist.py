"""Distributed training and testing on CPU-only machines (gloo backend).

MMEngine 0.10.7 assumes GPUs once a launcher is given:

* ``init_dist`` calls ``torch.cuda.set_device`` (fails without CUDA) and uses
  the config's backend (``nccl`` in MMDetection's configs);
* ``Runner.wrap_model`` passes ``device_ids=[LOCAL_RANK]`` to the DDP wrapper,
  which DDP rejects for CPU modules;
* PyTorch's ``SyncBatchNorm`` refuses CPU tensors in distributed training.

:func:`setup_cpu_distributed` (called by ``tools/train.py`` and
``tools/test.py`` before the runner is built) handles all three, and only when
CUDA is unavailable and a launcher is used: it initialises a gloo process group
from the launcher's environment variables (``Runner.setup_env`` skips
``init_dist`` when a group already exists) and selects
:class:`CPUDistributedDataParallel` through ``model_wrapper_cfg``. That wrapper
drops ``device_ids`` for CPU modules and swaps ``torch.nn.SyncBatchNorm``
layers for :class:`CPUSyncBatchNorm` (same parameters and buffers), which
synchronizes the batch statistics with two differentiable all-reduces.
With CUDA available nothing is changed: MMEngine's NCCL path runs as is.
"""
import copy
import datetime
import os
import subprocess
import warnings
from typing import Optional

import torch
import torch.distributed as dist
from mmengine.model import MMDistributedDataParallel
from mmengine.registry import MODEL_WRAPPERS
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..models.layers.sync_ce import _AllReduceSum

#: wrapper types that :func:`setup_cpu_distributed` may replace on CPU
_REPLACEABLE_WRAPPERS = (None, 'MMDistributedDataParallel',
                         'DistributedDataParallel')


class CPUSyncBatchNorm(_BatchNorm):
    """SyncBN for CPU tensors: what ``torch.nn.SyncBatchNorm`` layers become
    inside :class:`CPUDistributedDataParallel`.

    Same parameters, buffers and semantics as SyncBN: in distributed training
    the mean and the (biased) variance are those of the union of all workers'
    batches, weighted by each worker's number of positions ``N*H*W`` (workers
    may hold different batch or image sizes); ``running_var`` is updated with
    the unbiased global variance. The variance is computed around the global
    mean (two all-reduces, no ``E[x^2] - E[x]^2`` cancellation), and gradients
    flow through both all-reduces. In eval mode, with one worker or without a
    process group it is plain batch normalization.

    Deliberately not a ``torch.nn.SyncBatchNorm`` subclass: DDP refuses to wrap
    CPU modules that contain one.

    Args:
        num_features: ``C`` of an input ``(N, C, *)``.
        process_group: the group to synchronize over. Default: the world.
        **kwargs: the options of ``torch.nn.SyncBatchNorm``.
    """

    def __init__(self, num_features: int, *args,
                 process_group: Optional[dist.ProcessGroup] = None,
                 **kwargs) -> None:
        super().__init__(num_features, *args, **kwargs)
        self.process_group = process_group

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(
                f'expected at least 2D input (got {input.dim()}D input)')

    def _sync_needed(self, input: Tensor) -> bool:
        return (self.training and input.device.type == 'cpu'
                and dist.is_available() and dist.is_initialized()
                and dist.get_world_size(self.process_group or
                                        dist.group.WORLD) > 1)

    def forward(self, input: Tensor) -> Tensor:
        """Normalize ``input`` ``(N, C, *)`` with statistics over all workers."""
        if not self._sync_needed(input):
            return super().forward(input)
        self._check_input_dim(input)
        if input.shape[1] == 0:
            raise ValueError('CPUSyncBatchNorm number of input channels should '
                             'be non-zero')
        momentum = 0.0 if self.momentum is None else self.momentum
        if self.track_running_stats:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:
                momentum = 1.0 / float(self.num_batches_tracked)
        group = self.process_group or dist.group.WORLD
        channels = input.shape[1]
        dims = [0] + list(range(2, input.dim()))
        stats_dtype = torch.float64 if input.dtype == torch.float64 else torch.float32
        x = input.to(stats_dtype)
        count = torch.tensor([input.numel() // channels], dtype=stats_dtype)
        total = _AllReduceSum.apply(torch.cat([x.sum(dims), count]), group)
        n = total[channels]
        if n.item() < 2:
            raise ValueError('CPUSyncBatchNorm needs more than one value per '
                             f'channel over all workers, got {int(n.item())}')
        mean = total[:channels] / n
        shape = [1, channels] + [1] * (input.dim() - 2)
        centred = x - mean.view(shape)
        var = _AllReduceSum.apply((centred * centred).sum(dims), group) / n
        out = centred * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            out = out * self.weight.view(shape) + self.bias.view(shape)
        if self.track_running_stats:
            with torch.no_grad():
                self.running_mean.mul_(1 - momentum).add_(
                    mean.to(self.running_mean.dtype), alpha=momentum)
                unbiased = var * (n / (n - 1))
                self.running_var.mul_(1 - momentum).add_(
                    unbiased.to(self.running_var.dtype), alpha=momentum)
        return out.to(input.dtype)

    @classmethod
    def from_sync_bn(cls, layer: nn.SyncBatchNorm) -> 'CPUSyncBatchNorm':
        """A CPUSyncBatchNorm sharing (not copying) ``layer``'s tensors and
        keeping its options and train/eval mode."""
        converted = cls.__new__(cls)
        converted.__dict__.update({
            key: copy.copy(value) if isinstance(value, dict) else value
            for key, value in layer.__dict__.items()
        })
        return converted

    @classmethod
    def convert(cls, module: nn.Module) -> nn.Module:
        """Recursively replace every ``nn.SyncBatchNorm`` of ``module``."""
        if isinstance(module, nn.SyncBatchNorm):
            return cls.from_sync_bn(module)
        for name, child in module.named_children():
            new_child = cls.convert(child)
            if new_child is not child:
                module.add_module(name, new_child)
        return module


def _module_on_cpu(module: nn.Module) -> bool:
    tensors = list(module.parameters()) + list(module.buffers())
    return all(t.device.type == 'cpu' for t in tensors)


@MODEL_WRAPPERS.register_module()
class CPUDistributedDataParallel(MMDistributedDataParallel):
    """``MMDistributedDataParallel`` that also wraps CPU modules.

    For a module whose tensors are all on the CPU, ``device_ids`` and
    ``output_device`` (which MMEngine's runner always passes) are dropped, as
    DDP requires for CPU modules, and ``torch.nn.SyncBatchNorm`` layers are
    converted to :class:`CPUSyncBatchNorm`. Other modules are wrapped exactly
    like ``MMDistributedDataParallel``.

    Args:
        module: the model (on its final device).
        device_ids: ignored for CPU modules.
        convert_sync_bn: convert SyncBN layers of CPU modules. Default: True.
        **kwargs: the other options of ``MMDistributedDataParallel``.
    """

    def __init__(self, module: nn.Module, device_ids=None,
                 convert_sync_bn: bool = True, **kwargs) -> None:
        if _module_on_cpu(module):
            device_ids = None
            kwargs.pop('output_device', None)
            if convert_sync_bn:
                module = CPUSyncBatchNorm.convert(module)
        super().__init__(module=module, device_ids=device_ids, **kwargs)


def _environment_from_launcher(launcher: str) -> None:
    """Fill RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT for slurm and mpi
    the way MMEngine's ``init_dist`` does (torchrun sets them itself)."""
    if launcher == 'slurm':
        node_list = os.environ['SLURM_NODELIST']
        os.environ.setdefault('MASTER_PORT', '29500')
        if 'MASTER_ADDR' not in os.environ:
            os.environ['MASTER_ADDR'] = subprocess.getoutput(
                f'scontrol show hostname {node_list} | head -n1')
        os.environ['WORLD_SIZE'] = os.environ['SLURM_NTASKS']
        os.environ['RANK'] = os.environ['SLURM_PROCID']
        os.environ['LOCAL_RANK'] = os.environ.get('SLURM_LOCALID', '0')
    elif launcher == 'mpi':
        os.environ.setdefault('MASTER_PORT', '29500')
        if 'MASTER_ADDR' not in os.environ:
            raise KeyError('The environment variable MASTER_ADDR is not set')
        os.environ['WORLD_SIZE'] = os.environ['OMPI_COMM_WORLD_SIZE']
        os.environ['RANK'] = os.environ['OMPI_COMM_WORLD_RANK']
        os.environ['LOCAL_RANK'] = os.environ['OMPI_COMM_WORLD_LOCAL_RANK']
    elif launcher != 'pytorch':
        raise ValueError(f'Invalid launcher type: {launcher}')


def init_cpu_dist(launcher: str = 'pytorch',
                  timeout: Optional[float] = None) -> None:
    """Initialise a gloo process group from the launcher's environment.

    Does nothing if a process group exists already.

    Args:
        launcher: ``'pytorch'`` (torchrun: RANK, WORLD_SIZE, LOCAL_RANK,
            MASTER_ADDR, MASTER_PORT), ``'slurm'`` or ``'mpi'``.
        timeout: collective timeout in seconds (MMEngine's
            ``env_cfg.dist_cfg.timeout``). Default: torch's.
    """
    if dist.is_initialized():
        return
    _environment_from_launcher(launcher)
    missing = [key for key in ('RANK', 'WORLD_SIZE', 'MASTER_ADDR', 'MASTER_PORT')
               if key not in os.environ]
    if missing:
        raise RuntimeError(
            f'--launcher {launcher} needs the environment variables {missing}; '
            'start the script with tools/dist_train.sh / tools/dist_test.sh '
            '(python -m torch.distributed.run) or use --launcher none')
    kwargs = {}
    if timeout is not None:
        kwargs['timeout'] = datetime.timedelta(seconds=timeout)
    dist.init_process_group(backend='gloo', rank=int(os.environ['RANK']),
                            world_size=int(os.environ['WORLD_SIZE']), **kwargs)


def setup_cpu_distributed(cfg, launcher: str) -> bool:
    """Prepare a config for distributed CPU training/testing (in place).

    Call it before building the ``Runner``. Returns False and changes nothing
    when ``launcher == 'none'`` or CUDA is available. Otherwise initialises a
    gloo process group (:func:`init_cpu_dist`), records the backend in
    ``cfg.env_cfg.dist_cfg`` and selects :class:`CPUDistributedDataParallel`
    as the model wrapper (keeping the options of a configured
    ``MMDistributedDataParallel``; a custom wrapper type is left alone, with a
    warning).

    Args:
        cfg: an ``mmengine.Config``.
        launcher: the ``--launcher`` argument.

    Returns:
        Whether the CPU path was set up.
    """
    if launcher == 'none' or torch.cuda.is_available():
        return False
    env_cfg = cfg.get('env_cfg') or {}
    dist_cfg = dict(env_cfg.get('dist_cfg') or {})
    init_cpu_dist(launcher, timeout=dist_cfg.get('timeout'))
    dist_cfg['backend'] = 'gloo'
    cfg.env_cfg = dict(env_cfg, dist_cfg=dist_cfg)

    wrapper_cfg = cfg.get('model_wrapper_cfg')
    if wrapper_cfg is None:
        cfg.model_wrapper_cfg = dict(
            type='CPUDistributedDataParallel', broadcast_buffers=False,
            find_unused_parameters=cfg.get('find_unused_parameters', False))
    elif wrapper_cfg.get('type') in _REPLACEABLE_WRAPPERS:
        cfg.model_wrapper_cfg = dict(wrapper_cfg,
                                     type='CPUDistributedDataParallel')
    elif wrapper_cfg.get('type') != 'CPUDistributedDataParallel':
        warnings.warn(
            f'CPU distributed run with model_wrapper_cfg type '
            f'{wrapper_cfg.get("type")!r}: kept as configured; it must accept '
            'CPU modules (no device_ids)')
    return True


def finish_distributed_run() -> None:
    """End a finished distributed run of ``tools/train.py`` / ``test.py``.

    Destroys the process group while the interpreter is alive, then, in a
    launched multi-process run, flushes the logs and leaves with exit code 0
    without interpreter finalization: threads of gloo and of the runner's
    libraries torn down at finalization abort a finished process about once in
    six 2-process CPU runs ("terminate called without an active exception",
    exit code -6), which the launcher reports as a failed run. Nothing is left
    to do at that point (checkpoints, logs and results are written). A no-op
    for single-process runs.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return
    dist.destroy_process_group()
    if int(os.environ.get('WORLD_SIZE', '1')) <= 1:
        return
    import logging
    import sys
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(0)
