"""SyncCE in 2 processes on CUDA against independent float64 references and
one process on the concatenated batch.

With one GPU both processes share ``cuda:0`` and synchronize CUDA tensors over
gloo; with two or more GPUs, rank ``r`` uses ``cuda:r`` and NCCL. The
scenarios, inputs and layers are those of tests/test_dist/test_sync_ce_dist.py
(different ``N``, ``H`` and ``W`` per rank, float32 and float64, frozen gate,
mean/std ~700 in float32, a rank without images), compared as there with

* its ``PooledCE``: a float64 plain-autograd transcription of the released BN
  + CE over the LIST of the ranks' inputs (no plugin code), on the CPU, for
  every scenario;
* the single-process CE (here on ``cuda:0``) on ``torch.cat`` of the ranks'
  inputs, where the ranks share ``H, W`` (``EQUAL_HW``):

outputs, input gradients, parameter gradients summed over the ranks, running
buffers and parameters after the SGD steps, eval outputs.
"""
import os.path as osp
import sys
from typing import Dict, Iterator, List, Tuple

import pytest
import torch
import torch.distributed as dist
from torch import Tensor

HERE = osp.dirname(osp.abspath(__file__))
if HERE not in sys.path:  # the workers load this file by path
    sys.path.insert(0, HERE)

from cenet_mmdet.models.layers import SyncCE  # noqa: E402
from cenet_mmdet.testing.dist import run_process_group  # noqa: E402
from cuda_utils import CUDA_MARKS, DEVICE, FullFP32, load_test_module  # noqa: E402

pytestmark = CUDA_MARKS

SYNC = load_test_module('test_dist/test_sync_ce_dist.py')


def backend_and_devices() -> Tuple[str, List[str]]:
    """NCCL on ``cuda:0``/``cuda:1`` with 2 GPUs; else gloo, both ranks on
    ``DEVICE`` (one shared GPU, or the CPU for CENET_CUDA_TESTS_DEVICE=cpu)."""
    if DEVICE == 'cuda' and torch.cuda.device_count() >= 2:
        return 'nccl', ['cuda:0', 'cuda:1']
    device = 'cuda:0' if DEVICE == 'cuda' else DEVICE
    return 'gloo', [device, device]


# ----------------------------------------------------- worker side (spawned)
def _to_cpu(tensors: Dict[str, Tensor]) -> Dict[str, Tensor]:
    return {key: value.detach().cpu().clone() for key, value in tensors.items()}


def _train_in_group(name: str, rank: int, device: str) -> dict:
    """test_sync_ce_dist's worker scenario, with the layer and data on
    ``device``; results moved to the CPU."""
    spec = SYNC.SCENARIOS[name]
    ce = SYNC.make_ce(spec['dtype'], spec['frozen_gate'])
    if spec['build'] == 'from_ce':
        layer = SyncCE.from_ce(ce)
    else:
        layer = SyncCE(SYNC.C, group_size=SYNC.GROUP,
                       frozen_gate=spec['frozen_gate']).to(spec['dtype'])
        layer.load_state_dict(ce.state_dict())
    layer = layer.to(device).train()
    optimizer = SYNC.MomentumSGD(layer.parameters())
    steps = []
    for step in range(spec['steps']):
        x, g = SYNC.rank_inputs(name, step, rank)
        x = x.to(device, copy=True).requires_grad_()
        out = layer(x)
        (out * g.to(device)).sum().backward()
        grads = {}
        for pname, param in layer.named_parameters():
            if param.grad is None:
                param.grad = torch.zeros_like(param)
            grads[pname] = param.grad.detach().cpu().clone()
            dist.all_reduce(param.grad)  # DDP-like, summed instead of averaged
        optimizer.step()
        optimizer.zero_grad()
        steps.append(dict(out=out.detach().cpu(), grad_x=x.grad.cpu(), grads=grads))
    layer.eval()
    with torch.no_grad():
        eval_out = layer(SYNC.eval_input(name, rank).to(device)).cpu()
    return dict(steps=steps, eval=eval_out, state=_to_cpu(layer.state_dict()),
                param_names=[n for n, _ in layer.named_parameters()],
                device=str(out.device))


def scenarios(rank: int, world_size: int, devices: List[str]
              ) -> Iterator[Tuple[str, object]]:
    """Run in every worker (same order on every rank)."""
    assert world_size == 2
    device = devices[rank]
    if device.startswith('cuda'):
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = False  # full float32
    for name in SYNC.SCENARIOS:
        yield name, _train_in_group(name, rank, device)


# -------------------------------------------------- parent side (reference)
@pytest.fixture(scope='module')
def dist_run(tmp_path_factory):
    backend, devices = backend_and_devices()
    run = run_process_group(scenarios, tmp_path_factory.mktemp('sync_ce_cuda'),
                            world_size=2, args=(devices,), backend=backend,
                            timeout=240, collective_timeout=60,
                            start_method='spawn')
    return dict(run=run, backend=backend, devices=devices)


@pytest.fixture(autouse=True)
def _full_fp32():
    with FullFP32():
        yield


def _close(actual: Tensor, expected: Tensor, dtype: torch.dtype, what: str) -> None:
    SYNC._close(actual.detach().cpu(), expected.detach().cpu(), dtype, what)


def test_workers_finish_cleanly_on_the_device(dist_run):
    dist_run['run'].check_clean_exit()
    for rank, device in enumerate(dist_run['devices']):
        result = dist_run['run'].get(SYNC.EQUAL_HW[0])[rank]
        assert result['device'] == device, (rank, result['device'])


@pytest.mark.parametrize('name', list(SYNC.SCENARIOS))
def test_training_matches_pooled_float64_reference(dist_run, name):
    """The workers' results (moved to the CPU) against test_sync_ce_dist's
    ``PooledCE`` replay of the scenario in float64 on the CPU, with that
    test's checks and tolerances (its test function, on this run)."""
    SYNC.test_training_matches_pooled_reference(dist_run['run'], name)


@pytest.mark.parametrize('name', SYNC.EQUAL_HW)
def test_training_matches_ce_on_concatenated_batch(dist_run, name):
    """The single-process CE on ``cuda:0`` (the ranks' dtype) on torch.cat."""
    ranks = dist_run['run'].get(name)
    spec, dtype = SYNC.SCENARIOS[name], SYNC.SCENARIOS[name]['dtype']
    device = dist_run['devices'][0]
    layer = SYNC.make_ce(dtype, spec['frozen_gate']).to(device).train()
    optimizer = SYNC.MomentumSGD(layer.parameters())
    sizes = [shape[0] for shape in spec['shapes']]
    for step in range(spec['steps']):
        pairs = [SYNC.rank_inputs(name, step, rank) for rank in range(2)]
        x = torch.cat([p[0] for p in pairs]).to(device).requires_grad_()
        g = torch.cat([p[1] for p in pairs]).to(device)
        out = layer(x)
        (out * g).sum().backward()
        for rank, (out_r, grad_r) in enumerate(zip(out.split(sizes),
                                                   x.grad.split(sizes))):
            got = ranks[rank]['steps'][step]
            _close(got['out'], out_r, dtype, f'{name} step {step} rank {rank} output')
            _close(got['grad_x'], grad_r, dtype,
                   f'{name} step {step} rank {rank} input grad')
        for key, param in layer.named_parameters():
            summed = sum(r['steps'][step]['grads'][key] for r in ranks)
            _close(summed, param.grad, dtype, f'{name} step {step} grad of {key}')
        optimizer.step()
        optimizer.zero_grad()
    for key, value in layer.state_dict().items():
        for rank in range(2):
            _close(ranks[rank]['state'][key], value, dtype, f'{name} rank {rank} {key}')
        # every rank computes from the same reduced sums: identical, not close
        assert torch.equal(ranks[0]['state'][key], ranks[1]['state'][key]), key
    layer.eval()
    with torch.no_grad():
        for rank in range(2):
            _close(ranks[rank]['eval'], layer(SYNC.eval_input(name, rank).to(device)),
                   dtype, f'{name} rank {rank} eval output')
