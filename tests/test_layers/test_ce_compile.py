"""``torch.compile`` of CE, SyncCE, CEResNet and of an MMEngine runner's
``train_step`` (issue #20, 2), against the same modules run eagerly.

Each check compiles once (a module-scoped fixture runs a whole scenario and
keeps its results; the tests read them):

* a CE layer and a SyncCE layer without a process group (which computes CE),
  float32, non-trivial parameters and running statistics: two training steps
  (output, input gradient, every parameter gradient, every buffer after the
  step, with an SGD update in between), then eval with gradients (the
  ``norm_eval=True`` training path) and eval under ``no_grad``;
* no graph break inside the layer: ``torch._dynamo.explain`` gives one graph
  and no break in train, eval and eval under ``no_grad``, and the compile
  counter of the scenario above saw exactly one graph per mode (a break
  would add graphs, a silent fallback to eager would leave fewer);
* SyncCE in a real 2-process gloo group: compiled against eager in the
  same processes (output, gradients, running buffers), no graph break;
* a narrow CEResNet (``base_channels=8``, the stem and stage 1: 4 CE
  layers) in train (outputs, every gradient, every buffer) and eval;
* ``compile=True`` of an MMEngine ``Runner``: a small CE-ResNet classifier
  (:class:`cenet_mmdet.classification.ImageClassifier`), three iterations,
  against the same runner without ``compile``: equal losses, equal weights,
  and the runner's ``train_step`` was compiled and its graphs ran.

Bound: float32 results agree with eager to ``F32`` of the tensor's largest
entry (gradients: of the largest gradient of the module, see
:func:`assert_grads_close`). Compiled kernels reorder float32 sums, so
"equal" means this, not bitwise.

The compiled Mask R-CNN (the smoke config through ``Runner(compile=True)``
and its backbone compiled in eval) takes minutes to compile on a 2-core CPU:
it runs here only with ``CENET_COMPILE_DETECTOR=1`` and is part of
``tests/test_cuda/test_cuda_compile.py`` (tools/gpu/gpu_check.sh).

The helpers take a ``device``: ``tests/test_cuda/test_cuda_compile.py``
runs the same scenarios on CUDA tensors.
"""
import copy
import os
import os.path as osp
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import pytest
import torch
import torch.distributed as dist
from mmengine.hooks import Hook
from torch import Tensor, nn

import cenet_mmdet  # noqa: F401  (registers CEResNet, CE, SyncCE)
from cenet_mmdet.models.backbones import CEResNet
from cenet_mmdet.models.layers import CE, SyncCE
from cenet_mmdet.testing.dist import run_process_group

#: the compiler backend of these checks: ``aot_eager`` by default (Dynamo's
#: graph capture and AOTAutograd's joint forward/backward graph, without
#: code generation); ``CENET_COMPILE_BACKEND=inductor`` runs the same checks
#: through Inductor (about 10 minutes of C++ compilation on 2 cores with an
#: empty cache)
BACKEND = os.environ.get('CENET_COMPILE_BACKEND', 'aot_eager')
#: float32 agreement with eager, relative to the largest reference entry
F32 = 2e-5
C, GROUP = 32, 16
SHAPE = (3, C, 5, 6)
LR = 0.05
#: the opt-in for the detector checks (minutes of compilation on a CPU)
DETECTOR_SWITCH = 'CENET_COMPILE_DETECTOR'
REPO = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))


# ------------------------------------------------------------------ helpers
def relative_error(actual: Tensor, expected: Tensor) -> float:
    """max |actual - expected| / max |expected| (float64, on the CPU)."""
    actual, expected = actual.detach().cpu().double(), expected.detach().cpu().double()
    scale = expected.abs().max().item() if expected.numel() else 1.0
    return (actual - expected).abs().max().item() / max(scale, 1e-30)


def assert_close(actual: Tensor, expected: Tensor, what: str,
                 bound: float = F32) -> None:
    """Same shape and dtype, finite, and within ``bound`` of the largest
    entry of ``expected``."""
    assert tuple(actual.shape) == tuple(expected.shape), what
    assert actual.dtype == expected.dtype, f'{what}: {actual.dtype} vs {expected.dtype}'
    assert torch.isfinite(actual).all(), f'{what}: not finite'
    error = relative_error(actual, expected)
    assert error <= bound, f'{what}: relative error {error:.3g} > {bound:g}'


def assert_grads_close(actual: Dict[str, Tensor], expected: Dict[str, Tensor],
                       what: str, bound: float = F32) -> None:
    """Every gradient, relative to the larger of its own largest entry and
    1e-2 of the largest entry of all of them (a scalar gradient such as
    lambda's is a sum of terms that nearly cancel: its own size is no
    measure of float32 round-off)."""
    assert actual.keys() == expected.keys(), what
    floor = 1e-2 * max(g.detach().abs().max().item() for g in expected.values())
    for name, reference in expected.items():
        grad = actual[name]
        assert grad is not None and torch.isfinite(grad).all(), f'{what} {name}'
        scale = max(reference.detach().abs().max().item(), floor, 1e-30)
        error = (grad.detach().cpu().double() - reference.detach().cpu().double()
                 ).abs().max().item() / scale
        assert error <= bound, (f'{what} grad of {name}: error {error:.3g} of '
                                f'scale {scale:.3g} > {bound:g}')


def assert_states_close(actual: Dict[str, Tensor], expected: Dict[str, Tensor],
                        what: str, bound: float = F32) -> None:
    """Every buffer and parameter; integer ones (counters) exactly."""
    assert actual.keys() == expected.keys(), what
    for name, value in expected.items():
        if value.is_floating_point():
            assert_close(actual[name], value, f'{what} {name}', bound)
        else:
            assert torch.equal(actual[name].cpu(), value.cpu()), f'{what} {name}'


def make_layer(kind: str, seed: int = 0, device: str = 'cpu') -> CE:
    """A CE or SyncCE layer with non-trivial parameters and running
    statistics (every term of the layer matters)."""
    layer = {'CE': CE, 'SyncCE': SyncCE}[kind](C, group_size=GROUP)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for key, value in layer.state_dict().items():
            if not value.is_floating_point():
                continue
            value.copy_(torch.randn(value.shape, generator=gen) * 0.3)
            if key in ('weight', 'ce.aii.gate.1.weight'):
                value.add_(1.0)
            elif key in ('running_var', 'ce.aii.running_scale'):
                value.abs_().add_(0.5)
            elif key == 'ce.running_whitening':
                value.mul_(0.2).add_(torch.eye(GROUP))
    return layer.to(device)


def make_input(shape: Sequence[int], seed: int, device: str = 'cpu') -> Tensor:
    """Correlated channels with non-zero means."""
    gen = torch.Generator().manual_seed(seed)
    n, c, h, w = shape
    mix = torch.eye(c) + 0.4 * torch.randn(c, c, generator=gen)
    offset = torch.randn(c, generator=gen).view(1, c, 1, 1)
    z = torch.randn(n, c, h, w, generator=gen)
    return (torch.einsum('ij,njhw->nihw', mix, z) * 1.5 + offset).to(device)


class RanGraphCounter:
    """A compiler backend that counts the graphs that ran.

    ``frame_count``: distinct compiled graphs that have run at least once (one
    per graph break and per recompilation). Dynamo's own compile counter also
    counts a graph it compiled and then discarded when it restarted its
    analysis (with ``dynamic=True`` it first traces the layer's float
    attributes as symbols, then restarts with them specialized): that graph
    never runs and is not a break.
    """

    def __init__(self, backend: str) -> None:
        self.backend = backend
        self.runs: List[int] = []

    @property
    def frame_count(self) -> int:
        return sum(1 for runs in self.runs if runs)

    def __call__(self, graph_module, example_inputs):
        from torch._dynamo.backends.registry import lookup_backend
        compiled = lookup_backend(self.backend)(graph_module, example_inputs)
        index = len(self.runs)
        self.runs.append(0)

        def run(*args):
            self.runs[index] += 1
            return compiled(*args)
        return run


def compile_twin(module: nn.Module, backend: str = BACKEND, **options):
    """``(twin, compiled, counter)``: a deep copy of ``module``, the twin
    compiled through a :class:`RanGraphCounter` (``counter.frame_count``:
    graphs that ran so far, one per graph break and per recompilation)."""
    twin = copy.deepcopy(module)
    counter = RanGraphCounter(backend)
    return twin, torch.compile(twin, backend=counter, **options), counter


def _grads(module: nn.Module) -> Dict[str, Tensor]:
    return {name: param.grad.detach().clone()
            for name, param in module.named_parameters() if param.grad is not None}


def _state(module: nn.Module) -> Dict[str, Tensor]:
    return {name: value.detach().clone() for name, value in module.state_dict().items()}


def _sgd(module: nn.Module) -> None:
    with torch.no_grad():
        for param in module.parameters():
            if param.grad is not None:
                param.sub_(LR * param.grad)
                param.grad = None


def step(module: nn.Module, call, x: Tensor, g: Optional[Tensor]) -> dict:
    """One forward (and, with ``g``, backward of ``sum(out * g)``) of
    ``call`` (the module itself or its compiled twin) on a copy of ``x``."""
    x = x.detach().clone().requires_grad_(g is not None)
    out = call(x)
    result = dict(out=out.detach().clone())
    if g is not None:
        (out * g).sum().backward()
        result.update(grad_x=x.grad.clone(), grads=_grads(module))
    result['state'] = _state(module)
    return result


def layer_scenario(kind: str, device: str = 'cpu',
                   backend: str = BACKEND) -> dict:
    """Eager and compiled results of one layer (see the module docstring),
    and the graph count after each phase."""
    torch._dynamo.reset()
    eager = make_layer(kind, device=device).train()
    twin, compiled, counter = compile_twin(eager, backend)
    results: Dict[str, Tuple[dict, dict]] = {}
    graphs: Dict[str, int] = {}
    for i in range(2):
        x = make_input(SHAPE, 10 + i, device)
        g = make_input(SHAPE, 20 + i, device)
        results[f'train{i}'] = (step(twin, compiled, x, g), step(eager, eager, x, g))
        _sgd(twin), _sgd(eager)
        graphs[f'train{i}'] = counter.frame_count
    eager.eval(), twin.eval()
    x, g = make_input(SHAPE, 30, device) * 1.5, make_input(SHAPE, 31, device)
    results['eval_grad'] = (step(twin, compiled, x, g), step(eager, eager, x, g))
    graphs['eval_grad'] = counter.frame_count
    with torch.no_grad():
        results['eval'] = (step(twin, compiled, x, None), step(eager, eager, x, None))
    graphs['eval'] = counter.frame_count
    torch._dynamo.reset()
    return dict(results=results, graphs=graphs)


def check_result(actual: dict, expected: dict, what: str,
                 bound: float = F32) -> None:
    assert_close(actual['out'], expected['out'], f'{what} output', bound)
    if 'grad_x' in expected:
        assert_close(actual['grad_x'], expected['grad_x'], f'{what} input grad',
                     bound)
        assert expected['grads'], f'{what}: no parameter gradient'
        assert_grads_close(actual['grads'], expected['grads'], what, bound)
    assert_states_close(actual['state'], expected['state'], f'{what} state', bound)


def explain_layer(kind: str, mode: str, device: str = 'cpu'):
    """``torch._dynamo.explain`` of a fresh layer in ``mode`` ('train',
    'eval' with gradients, 'eval_no_grad')."""
    torch._dynamo.reset()
    layer = make_layer(kind, device=device).train(mode == 'train')
    x = make_input(SHAPE, 40, device).requires_grad_(mode != 'eval_no_grad')
    with torch.set_grad_enabled(mode != 'eval_no_grad'):
        explanation = torch._dynamo.explain(layer)(x)
    torch._dynamo.reset()
    return explanation


def assert_no_graph_break(explanation, what: str) -> None:
    reasons = [str(getattr(b, 'reason', b)) for b in explanation.break_reasons]
    assert explanation.graph_break_count == 0 and not reasons, (
        f'{what}: {explanation.graph_break_count} graph break(s): {reasons}')
    assert explanation.graph_count == 1, f'{what}: {explanation.graph_count} graphs'


# ------------------------------------------------------------ (a) the layer
@pytest.fixture(scope='module', params=['CE', 'SyncCE'])
def layer_run(request):
    return request.param, layer_scenario(request.param)


@pytest.mark.parametrize('phase', ['train0', 'train1', 'eval_grad', 'eval'])
def test_compiled_layer_matches_eager(layer_run, phase):
    kind, run = layer_run
    actual, expected = run['results'][phase]
    check_result(actual, expected, f'{kind} {phase}')


def test_compiled_layer_is_one_graph_per_mode(layer_run):
    """One graph for both training steps (no recompilation), one more for
    eval with gradients, one more under no_grad: no break, no fallback."""
    kind, run = layer_run
    assert run['graphs'] == dict(train0=1, train1=1, eval_grad=2, eval=3), kind


@pytest.mark.parametrize('mode', ['train', 'eval', 'eval_no_grad'])
@pytest.mark.parametrize('kind', ['CE', 'SyncCE'])
def test_no_graph_break_inside_the_layer(kind, mode):
    assert_no_graph_break(explain_layer(kind, mode), f'{kind} {mode}')


def dynamic_shape_scenario(device: str = 'cpu', backend: str = BACKEND) -> dict:
    """A CE layer compiled with ``dynamic=True`` (symbolic N, H, W: a
    detector's batches differ in size) on three input shapes in training:
    one graph for all of them, outputs and input gradients as eager."""
    torch._dynamo.reset()
    eager = make_layer('CE', device=device).train()
    twin, compiled, counter = compile_twin(eager, backend, dynamic=True)
    results = []
    for i, shape in enumerate([(2, C, 5, 6), (3, C, 4, 7), (4, C, 6, 3)]):
        x, g = make_input(shape, 60 + i, device), make_input(shape, 70 + i, device)
        results.append((step(twin, compiled, x, g), step(eager, eager, x, g)))
    graphs = counter.frame_count
    torch._dynamo.reset()
    return dict(results=results, graphs=graphs)


def test_dynamic_shapes_one_graph_no_break():
    run = dynamic_shape_scenario()
    for i, (actual, expected) in enumerate(run['results']):
        check_result(actual, expected, f'shape {i}')
    assert run['graphs'] == 1, f'{run["graphs"]} graphs for 3 shapes'


# ----------------------------------------------- (b) SyncCE in 2 processes
def _rank_shape(rank: int) -> Tuple[int, int, int, int]:
    return (2 + rank, C, 5, 6)  # different N per rank


def _to_cpu(result: dict) -> dict:
    """Tensors (also in nested dicts) moved to the CPU."""
    return {key: _to_cpu(value) if isinstance(value, dict) else
            value.cpu() if isinstance(value, Tensor) else value
            for key, value in result.items()}


def compiled_sync_ce(rank: int, world_size: int,
                     devices: Sequence[str] = ('cpu', 'cpu'),
                     backend: str = BACKEND) -> Iterator[Tuple[str, object]]:
    """Worker: SyncCE compiled and eager in the same group, two training
    steps and an eval step, and ``explain`` of a training forward (rank
    ``r`` on ``devices[r]``; results on the CPU)."""
    device = devices[rank]
    if device.startswith('cuda'):
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = False  # full float32
        torch.backends.cudnn.allow_tf32 = False
    eager = make_layer('SyncCE', device=device).train()
    assert eager._distributed()
    twin, compiled, counter = compile_twin(eager, backend)
    for i in range(2):
        x = make_input(_rank_shape(rank), 100 * rank + i, device)
        g = make_input(_rank_shape(rank), 100 * rank + 50 + i, device)
        actual, expected = step(twin, compiled, x, g), step(eager, eager, x, g)
        for result in (actual, expected):  # DDP-like: summed over the ranks
            for grad in result['grads'].values():
                dist.all_reduce(grad)
        yield f'train{i}', dict(actual=_to_cpu(actual), expected=_to_cpu(expected),
                                graphs=counter.frame_count)
        _sgd(twin), _sgd(eager)
    eager.eval(), twin.eval()
    x = make_input(_rank_shape(rank), 100 * rank + 99, device)
    with torch.no_grad():
        yield 'eval', dict(actual=_to_cpu(step(twin, compiled, x, None)),
                           expected=_to_cpu(step(eager, eager, x, None)),
                           graphs=counter.frame_count)
    torch._dynamo.reset()
    layer = make_layer('SyncCE', device=device).train()
    x = make_input(_rank_shape(rank), 7, device).requires_grad_()
    explanation = torch._dynamo.explain(layer)(x)
    yield 'explain', dict(
        graphs=explanation.graph_count, breaks=explanation.graph_break_count,
        reasons=[str(getattr(b, 'reason', b)) for b in explanation.break_reasons])


@pytest.fixture(scope='module')
def dist_run(tmp_path_factory):
    run = run_process_group(compiled_sync_ce, tmp_path_factory.mktemp('compile'),
                            timeout=240, collective_timeout=120)
    run.check_clean_exit()
    return run


def check_sync_phase(run, phase: str, bound: float = F32) -> None:
    """Compiled against eager on every rank; the gradients summed over the
    ranks."""
    for rank, result in enumerate(run.get(phase)):
        check_result(result['actual'], result['expected'], f'rank {rank} {phase}',
                     bound)
        assert result['graphs'] >= 1, 'nothing was compiled'


def check_sync_graphs(run) -> None:
    """One graph in training (both steps) and one in eval on every rank, and
    ``explain`` finds no break in a synchronized training forward."""
    for rank, result in enumerate(run.get('explain')):
        assert result['breaks'] == 0 and result['graphs'] == 1, (rank, result)
    assert [r['graphs'] for r in run.get('train1')] == [1, 1]
    assert [r['graphs'] for r in run.get('eval')] == [2, 2]


@pytest.mark.parametrize('phase', ['train0', 'train1', 'eval'])
def test_compiled_sync_ce_in_two_processes_matches_eager(dist_run, phase):
    check_sync_phase(dist_run, phase)


def test_compiled_sync_ce_in_two_processes_has_no_graph_break(dist_run):
    check_sync_graphs(dist_run)


# ---------------------------------------------------------- (c) CEResNet
def make_backbone(device: str = 'cpu', seed: int = 0) -> CEResNet:
    """CE-ResNet-50 layout, 8 base channels, stage 1 only (the stem CE and
    3 CE bottlenecks, the first with a downsample branch)."""
    torch.manual_seed(seed)
    model = CEResNet(depth=50, base_channels=8, num_stages=1, out_indices=(0, ),
                     strides=(1, ), dilations=(1, ), norm_eval=False,
                     init_cfg=None)
    model.init_weights()
    with torch.no_grad():  # lambda away from 0.5, the gate trained a bit
        gen = torch.Generator().manual_seed(seed + 1)
        for layer in model.modules():
            if isinstance(layer, CE):
                layer.ce.lambda_logit.normal_(0, 1, generator=gen)
    assert model.num_ce_layers == 4
    return model.to(device)


def backbone_scenario(device: str = 'cpu', backend: str = BACKEND,
                      shape=(2, 3, 32, 32)) -> dict:
    """A train step (outputs, gradients, buffers after it), then eval."""
    torch._dynamo.reset()
    eager = make_backbone(device).train()
    twin, compiled, counter = compile_twin(eager, backend)
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(shape, generator=gen).to(device)
    results = {}
    for name, module, call in (('compiled', twin, compiled), ('eager', eager, eager)):
        inputs = x.clone().requires_grad_()
        outs = call(inputs)
        weights = [torch.randn(o.shape, generator=torch.Generator().manual_seed(i)
                               ).to(device) for i, o in enumerate(outs)]
        sum((o * w).sum() for o, w in zip(outs, weights)).backward()
        results[name] = dict(outs=[o.detach() for o in outs],
                             grad_x=inputs.grad.clone(), grads=_grads(module),
                             state=_state(module),
                             num_params=len(list(module.parameters())))
    train_graphs = counter.frame_count
    eager.eval(), twin.eval()
    with torch.no_grad():
        for name, call in (('compiled', compiled), ('eager', eager)):
            results[name]['eval'] = [o.clone() for o in call(x)]
    graphs = counter.frame_count
    torch._dynamo.reset()
    return dict(results=results, train_graphs=train_graphs, graphs=graphs)


def check_backbone(run: dict, bound: float = F32) -> None:
    actual, expected = run['results']['compiled'], run['results']['eager']
    for i, (a, e) in enumerate(zip(actual['outs'], expected['outs'])):
        assert_close(a, e, f'train output {i}', bound)
    assert_close(actual['grad_x'], expected['grad_x'], 'input grad', bound)
    assert len(expected['grads']) == expected['num_params'], 'a parameter got no gradient'
    assert_grads_close(actual['grads'], expected['grads'], 'CEResNet', bound)
    assert_states_close(actual['state'], expected['state'], 'CEResNet state', bound)
    for i, (a, e) in enumerate(zip(actual['eval'], expected['eval'])):
        assert_close(a, e, f'eval output {i}', bound)
    # one graph in train and one in eval: no break anywhere in the backbone
    assert (run['train_graphs'], run['graphs']) == (1, 2)


@pytest.fixture(scope='module')
def backbone_run():
    return backbone_scenario()


def test_compiled_ce_resnet_matches_eager(backbone_run):
    check_backbone(backbone_run)


# ----------------------------------------- (d) Runner(compile=True)
class _Images(torch.utils.data.Dataset):
    """Random 32x32 images of 3 classes (the classifier's data samples)."""

    def __init__(self, num: int = 12, size: int = 32) -> None:
        from cenet_mmdet.classification import ClsDataSample
        gen = torch.Generator().manual_seed(0)
        self.items = [
            dict(inputs=torch.randint(0, 256, (3, size, size), generator=gen,
                                      dtype=torch.uint8),
                 data_samples=ClsDataSample().set_gt_label(i % 3))
            for i in range(num)
        ]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict:
        return self.items[index]


CLASSIFIER = dict(
    type='ImageClassifier',
    data_preprocessor=dict(type='ClsDataPreprocessor', num_classes=3,
                           mean=[123.675, 116.28, 103.53],
                           std=[58.395, 57.12, 57.375]),
    backbone=dict(type='CEResNet', depth=50, base_channels=8, num_stages=1,
                  strides=(1, ), dilations=(1, ), out_indices=(0, ),
                  norm_eval=False, init_cfg=None),
    neck=dict(type='GlobalAveragePooling'),
    head=dict(type='LinearClsHead', num_classes=3, in_channels=32))


class RecordLosses(Hook):
    """Records the loss of every training iteration."""

    def __init__(self) -> None:
        self.losses: List[float] = []

    def after_train_iter(self, runner, batch_idx, data_batch=None,
                         outputs=None) -> None:
        self.losses.append(float(outputs['loss']))


def run_runner(work_dir: str, compile_cfg, iters: int = 3) -> dict:
    """Train the small classifier ``iters`` iterations with an MMEngine
    ``Runner`` (batch 4, SGD with momentum); its losses and final weights."""
    from mmengine.dataset import pseudo_collate
    from mmengine.runner import Runner

    recorder = RecordLosses()
    loader = torch.utils.data.DataLoader(_Images(), batch_size=4, shuffle=False,
                                         collate_fn=pseudo_collate)
    torch._dynamo.reset()
    runner = Runner(
        model=copy.deepcopy(CLASSIFIER), work_dir=work_dir,
        train_dataloader=loader,
        train_cfg=dict(type='IterBasedTrainLoop', max_iters=iters),
        optim_wrapper=dict(optimizer=dict(type='SGD', lr=0.02, momentum=0.9)),
        default_hooks=dict(logger=dict(type='LoggerHook', interval=100),
                           checkpoint=None),
        custom_hooks=[recorder], randomness=dict(seed=0),
        default_scope='mmdet', log_level='WARNING',
        # MMEngine reads ``compile`` from the config (as a config file sets it)
        cfg=dict(compile=compile_cfg))
    before = dict(torch._dynamo.utils.counters['stats'])
    runner.train()
    train_step = runner.model.train_step
    result = dict(
        losses=recorder.losses,
        state={k: v.detach().cpu().clone()
               for k, v in runner.model.state_dict().items()},
        compiled=hasattr(train_step, '_torchdynamo_orig_callable'),
        graphs=torch._dynamo.utils.counters['stats']['unique_graphs']
        - before.get('unique_graphs', 0))
    torch._dynamo.reset()
    return result


#: the config's ``compile``: ``True`` (Inductor) or a dict of options
RUNNER_COMPILE = True if BACKEND == 'inductor' else dict(backend=BACKEND)


@pytest.fixture(scope='module')
def runner_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp('runner')
    return dict(eager=run_runner(str(root / 'eager'), None),
                compiled=run_runner(str(root / 'compiled'), RUNNER_COMPILE))


def check_runner_runs(runs: dict, bound: float = F32) -> None:
    eager, compiled = runs['eager'], runs['compiled']
    assert not eager['compiled'] and compiled['compiled'], 'compile=True ignored'
    assert compiled['graphs'] >= 1, 'no compiled graph ran'
    assert len(compiled['losses']) == len(eager['losses']) == 3
    for i, (a, e) in enumerate(zip(compiled['losses'], eager['losses'])):
        assert abs(a - e) <= bound * abs(e), f'iteration {i + 1}: loss {a} vs {e}'
    assert_states_close(compiled['state'], eager['state'], 'weights after 3 iterations',
                        bound=10 * bound)


def test_runner_compile_true_matches_eager(runner_runs):
    check_runner_runs(runner_runs)


# ---------------------------- (e) Mask R-CNN, compiled (opt-in on the CPU)
SMOKE_CE = osp.join(REPO, 'configs', 'cenet', 'smoke',
                    'mask-rcnn_ce-r50_fpn_shapes-smoke.py')
DETECTOR_ITERS = 2


def make_shapes(root: str) -> str:
    """The synthetic shapes set (8 train, 4 val images, 128 px) under
    ``root``; returns its data root."""
    import subprocess
    import sys
    data_root = osp.join(root, 'synthetic_shapes')
    subprocess.run([sys.executable, osp.join(REPO, 'tools', 'misc',
                                             'make_synthetic_coco.py'),
                    data_root, '--train', '8', '--val', '4', '--size', '128',
                    '--seed', '0'], check=True, capture_output=True, timeout=300)
    return data_root + '/'


def detector_runner(data_root: str, work_dir: str, compile_cfg):
    """A ``Runner`` of the CE Mask R-CNN smoke config on ``data_root``:
    ``DETECTOR_ITERS`` iterations, no validation, no checkpoint, with the
    config's ``compile`` set to ``compile_cfg``."""
    from mmengine.config import Config
    from mmengine.runner import Runner
    cfg = Config.fromfile(SMOKE_CE)
    ann = data_root + 'annotations/instances_{}.json'
    cfg.merge_from_dict({
        'work_dir': work_dir, 'log_level': 'WARNING', 'compile': compile_cfg,
        'train_cfg.max_iters': DETECTOR_ITERS, 'train_cfg.val_begin': 100,
        'train_dataloader.dataset.data_root': data_root,
        'val_dataloader.dataset.data_root': data_root,
        'test_dataloader.dataset.data_root': data_root,
        'val_evaluator.ann_file': ann.format('val'),
        'test_evaluator.ann_file': ann.format('val'),
    })
    cfg.default_hooks.checkpoint = None
    return Runner.from_cfg(cfg)


def detector_scenario(root: str) -> dict:
    """Train the smoke Mask R-CNN eagerly and with ``compile=True``
    (Inductor; the runner compiles ``train_step``): the losses of every
    iteration. Then the eager model's backbone compiled in eval against the
    eager backbone on a validation batch: the features and the detections'
    scores."""

    data_root = make_shapes(root)
    result, runners = {}, {}
    for name, compile_cfg in (('eager', None), ('compiled', True)):
        torch._dynamo.reset()
        runner = runners[name] = detector_runner(data_root, osp.join(root, name),
                                                 compile_cfg)
        recorder = RecordLosses()
        runner.register_hook(recorder)
        runner.train()
        result[name] = recorder.losses
        result[f'{name}_step_compiled'] = hasattr(runner.model.train_step,
                                                  '_torchdynamo_orig_callable')
    # eval: the eager runner's trained model, and a copy with its backbone compiled
    torch._dynamo.reset()
    runner = runners['eager']
    model = runner.model.eval()
    batch = next(iter(runner.build_dataloader(runner.cfg.val_dataloader)))
    twin = copy.deepcopy(model)
    twin.backbone = torch.compile(twin.backbone)
    with torch.no_grad():
        inputs = model.data_preprocessor(batch, False)['inputs']
        result['features'] = ([f.cpu() for f in twin.backbone(inputs)],
                              [f.cpu() for f in model.backbone(inputs)])
        result['scores'] = [
            [sample.pred_instances.scores.sort(descending=True).values.cpu()
             for sample in m.test_step(batch)] for m in (twin, model)]
    torch._dynamo.reset()
    return result


def check_detector(run: dict, bound: float = F32) -> None:
    assert run['compiled_step_compiled'] and not run['eager_step_compiled']
    eager, compiled = run['eager'], run['compiled']
    assert len(eager) == len(compiled) == DETECTOR_ITERS
    for i, (a, e) in enumerate(zip(compiled, eager)):
        assert abs(a - e) <= 1e-3 * abs(e), f'iteration {i + 1}: loss {a} vs {e}'
    actual, expected = run['features']
    for i, (a, e) in enumerate(zip(actual, expected)):
        assert_close(a, e, f'eval backbone output {i}', bound)
    actual, expected = run['scores']
    assert sum(len(s) for s in expected) > 0, 'no detection'
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a, e, rtol=0, atol=1e-3)


@pytest.mark.skipif(os.environ.get(DETECTOR_SWITCH) != '1',
                    reason=f'minutes of compilation on a CPU: set '
                    f'{DETECTOR_SWITCH}=1 (tests/test_cuda/test_cuda_compile.py '
                    f'runs it on a GPU)')
def test_compiled_mask_rcnn_smoke(tmp_path):
    check_detector(detector_scenario(str(tmp_path)))
