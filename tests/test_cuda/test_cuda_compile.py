"""``torch.compile`` on CUDA (issue #20, 2): the checks of
tests/test_layers/test_ce_compile.py on CUDA tensors, through Inductor
(Triton kernels), plus the compiled Mask R-CNN smoke run.

* CE and SyncCE (no process group): two training steps, eval with
  gradients, eval under ``no_grad``: outputs, input and parameter
  gradients and every buffer against the same layer run eagerly; one
  graph per mode;
* no graph break inside the layer (``torch._dynamo.explain``);
* SyncCE in 2 processes (one GPU: gloo on CUDA tensors; 2 GPUs: NCCL),
  compiled against eager in the same group;
* a narrow CEResNet (stem + stage 1) in train and eval;
* ``Runner`` with ``compile=True`` on a small CE-ResNet classifier, against
  the runner without it (the runner puts the model on the GPU);
* the CE Mask R-CNN smoke config (configs/cenet/smoke/) trained for a few
  iterations by a ``Runner`` with ``compile=True`` against the eager runner
  (losses), and its backbone compiled in eval (features and detection
  scores).

Bound: ``BOUND`` of the largest reference entry (float32, TF32 off in
cuBLAS and cuDNN). With CENET_CUDA_TESTS_DEVICE=cpu the same tests run on the
CPU through Inductor's C++ backend (slow: about 10 minutes of compilation
with an empty cache on 2 cores, the Mask R-CNN most of it).
"""
import os.path as osp
import sys
from typing import Iterator, List, Tuple

import pytest
import torch

HERE = osp.dirname(osp.abspath(__file__))
if HERE not in sys.path:  # the workers load this file by path
    sys.path.insert(0, HERE)

from cenet_mmdet.testing.dist import run_process_group  # noqa: E402
from cuda_utils import CUDA_MARKS, DEVICE, FullFP32, load_test_module  # noqa: E402

pytestmark = CUDA_MARKS

COMPILE = load_test_module('test_layers/test_ce_compile.py')
BACKEND = 'inductor'
#: float32 agreement of compiled and eager results, relative to the largest
#: reference entry (the CPU's bound; Triton reorders sums as C++ kernels do)
BOUND = COMPILE.F32


@pytest.fixture(autouse=True, scope='module')
def _full_fp32() -> Iterator[None]:
    """No TF32 (cuDNN defaults to it for convolutions), also around the
    module-scoped runs."""
    with FullFP32():
        yield


def backend_and_devices() -> Tuple[str, List[str]]:
    """NCCL on ``cuda:0``/``cuda:1`` with 2 GPUs; else gloo, both ranks on
    ``DEVICE``."""
    if DEVICE == 'cuda' and torch.cuda.device_count() >= 2:
        return 'nccl', ['cuda:0', 'cuda:1']
    device = 'cuda:0' if DEVICE == 'cuda' else DEVICE
    return 'gloo', [device, device]


# ------------------------------------------------------------ the layer
@pytest.fixture(scope='module', params=['CE', 'SyncCE'])
def layer_run(request):
    return request.param, COMPILE.layer_scenario(request.param, DEVICE, BACKEND)


@pytest.mark.parametrize('phase', ['train0', 'train1', 'eval_grad', 'eval'])
def test_compiled_layer_matches_eager(layer_run, phase):
    kind, run = layer_run
    actual, expected = run['results'][phase]
    assert actual['out'].device.type == DEVICE
    COMPILE.check_result(actual, expected, f'{kind} {phase}', BOUND)


def test_compiled_layer_is_one_graph_per_mode(layer_run):
    kind, run = layer_run
    assert run['graphs'] == dict(train0=1, train1=1, eval_grad=2, eval=3), kind


@pytest.mark.parametrize('mode', ['train', 'eval', 'eval_no_grad'])
@pytest.mark.parametrize('kind', ['CE', 'SyncCE'])
def test_no_graph_break_inside_the_layer(kind, mode):
    COMPILE.assert_no_graph_break(COMPILE.explain_layer(kind, mode, DEVICE),
                                  f'{kind} {mode} on {DEVICE}')


# ---------------------------------------------------- SyncCE, 2 processes
@pytest.fixture(scope='module')
def dist_run(tmp_path_factory):
    backend, devices = backend_and_devices()
    run = run_process_group(COMPILE.compiled_sync_ce,
                            tmp_path_factory.mktemp('compile_cuda'),
                            args=(devices, BACKEND), backend=backend,
                            timeout=480, collective_timeout=300,
                            start_method='spawn')
    run.check_clean_exit()
    return run


@pytest.mark.parametrize('phase', ['train0', 'train1', 'eval'])
def test_compiled_sync_ce_in_two_processes_matches_eager(dist_run, phase):
    COMPILE.check_sync_phase(dist_run, phase, BOUND)


def test_compiled_sync_ce_in_two_processes_has_no_graph_break(dist_run):
    COMPILE.check_sync_graphs(dist_run)


# ------------------------------------------------------------- CEResNet
def test_compiled_ce_resnet_matches_eager():
    run = COMPILE.backbone_scenario(DEVICE, BACKEND)
    assert run['results']['compiled']['outs'][0].device.type == DEVICE
    COMPILE.check_backbone(run, BOUND)


# ------------------------------------------------ Runner(compile=True)
def test_runner_compile_true_matches_eager(tmp_path):
    runs = dict(eager=COMPILE.run_runner(str(tmp_path / 'eager'), None),
                compiled=COMPILE.run_runner(str(tmp_path / 'compiled'), True))
    COMPILE.check_runner_runs(runs, BOUND)


# ------------------------------------------------------------ Mask R-CNN
def test_compiled_mask_rcnn_smoke(tmp_path):
    COMPILE.check_detector(COMPILE.detector_scenario(str(tmp_path)), BOUND)
