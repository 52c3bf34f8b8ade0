"""Test-session settings.

* The tests use tiny tensors, for which one intra-op thread is faster than
  several (and CI machines have 2 cores).
* Registers the ``cuda`` marker (tests/test_cuda: skipped without a CUDA
  device).
* Every test must leave the process-wide state as it found it, so that the
  suite passes in any order (e.g. a ``Runner(default_scope='mmengine')`` left
  the ``mmengine`` scope current, and a later ``MODELS.build`` of
  ``CEResNet`` failed). The autouse fixture :func:`_global_state_is_restored`
  snapshots that state before each test and puts it back after it
  (:func:`_module_state_is_restored` does the same around each test module,
  for its module-scoped fixtures):

  - MMEngine's current default scope (``DefaultScope``), the multiprocessing
    start method and OpenCV's thread count, which MMEngine's ``Runner`` and
    MMDetection's ``register_all_modules`` set by design: restored silently;
  - torch's thread count, deterministic-algorithm and cuDNN switches,
    TF32/float32-precision switches, default dtype, and the default
    ``torch.distributed`` process group: restored, and the test that changed
    them fails (such a change alters the numbers or the code paths of the
    tests that follow).
"""
import multiprocessing
import sys
from typing import Any, Callable, Dict, List, Tuple

import pytest
import torch
import torch.distributed as dist

torch.set_num_threads(1)


def pytest_configure(config) -> None:
    """Register this suite's markers."""
    config.addinivalue_line(
        'markers', 'cuda: needs a CUDA device (run by tools/gpu/gpu_check.sh)')


# ------------------------------------------- parallel runs (pytest-xdist)
#: Test files that share a session fixture: a parallel run gives them to one
#: worker, so that the fixture runs once (the SyncCE smoke run of
#: tests/test_tools/conftest.py).
SHARED_FIXTURE_GROUPS = {
    'test_tools/test_e2e_cpu.py': 'syncce_smoke_run',
    'test_tools/test_exact_resume.py': 'syncce_smoke_run',
}

#: The groups that take longest (about 15 s or more on 2 cores), longest
#: first. In parallel runs they are handed out first (tools/run_tests.sh:
#: ``--no-loadscope-reorder``), so that no worker starts a long one while the
#: other has nothing left to do. Only the order changes.
SLOW_FIRST = (
    'syncce_smoke_run',
    'test_tools/test_channel_analysis_tools.py',
    'test_tools/test_imagenet_dist_train.py',
    'test_layers/test_ce_compile.py',
    'test_tools/test_multi_seed_ap.py',
    'test_backbones/test_onnx_export.py',
    'test_docs/test_quick_start.py',
    'test_tools/test_user_edges.py',
)


def parallel_unit(nodeid: str) -> str:
    """The unit of a parallel run that holds the test ``nodeid``: its file
    (whose module fixtures then run once), or its group in
    :data:`SHARED_FIXTURE_GROUPS`."""
    path = nodeid.split('::', 1)[0]
    for suffix, group in SHARED_FIXTURE_GROUPS.items():
        if path.endswith(suffix):
            return group
    return path


def _slow_rank(group: str) -> int:
    for rank, name in enumerate(SLOW_FIRST):
        if group == name or group.endswith(name):
            return rank
    return len(SLOW_FIRST)


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    """``--dist loadfile`` (tools/run_tests.sh) with the files of
    :data:`SHARED_FIXTURE_GROUPS` in one unit (pytest-xdist's own
    ``xdist_group`` marker has no effect with pytest 9)."""
    if config.getvalue('dist') != 'loadfile':
        return None
    from xdist.scheduler import LoadFileScheduling

    class GroupedFiles(LoadFileScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return parallel_unit(nodeid)

    return GroupedFiles(config, log)


def pytest_collection_modifyitems(config, items) -> None:
    """In a pytest-xdist worker, the groups of :data:`SLOW_FIRST` first
    (every worker orders its collection the same way); a run in one process
    keeps the file order."""
    if hasattr(config, 'workerinput'):
        order = {id(item): i for i, item in enumerate(items)}
        items.sort(key=lambda item: (_slow_rank(parallel_unit(item.nodeid)),
                                     order[id(item)]))


# ------------------------------------------------------- process-wide state
def _precision_switches() -> List[Tuple[str, Any, str]]:
    """``(name, object, attribute)`` of the float32-precision switches: the
    legacy TF32 ones, then the per-backend ``fp32_precision`` settings (torch
    >= 2.9), which are restored last (setting a legacy switch rewrites
    them)."""
    backends = torch.backends
    found = [('torch.backends.cuda.matmul.allow_tf32', backends.cuda.matmul,
              'allow_tf32'),
             ('torch.backends.cudnn.allow_tf32', backends.cudnn, 'allow_tf32')]
    for name in ('', 'cuda.matmul', 'cudnn', 'cudnn.conv', 'cudnn.rnn',
                 'mkldnn', 'mkldnn.matmul', 'mkldnn.conv', 'mkldnn.rnn'):
        target = backends
        for part in filter(None, name.split('.')):
            target = getattr(target, part, None)
        if target is not None and hasattr(target, 'fp32_precision'):
            found.append((f'torch.backends.{name}.fp32_precision'.replace('..', '.'),
                          target, 'fp32_precision'))
    return found


def _attribute(obj: Any, attr: str) -> Tuple[Callable[[], Any], Callable[[Any], None]]:
    return (lambda: getattr(obj, attr)), (lambda value: setattr(obj, attr, value))


def _state_items() -> Dict[str, Tuple[Callable[[], Any], Callable[[Any], None], bool]]:
    """name -> (get, set, strict); ``strict``: a test that changes it fails.
    Insertion order is the restoring order (the float32 matmul precision
    before the per-backend switches it implies)."""
    items = {
        'torch.get_num_threads()': (torch.get_num_threads, torch.set_num_threads,
                                    True),
        'torch.get_default_dtype()': (torch.get_default_dtype,
                                      torch.set_default_dtype, True),
        'deterministic algorithms (enabled, warn_only)': (
            lambda: (torch.are_deterministic_algorithms_enabled(),
                     torch.is_deterministic_algorithms_warn_only_enabled()),
            lambda value: torch.use_deterministic_algorithms(value[0],
                                                             warn_only=value[1]),
            True),
        'torch.backends.cudnn.deterministic': (
            *_attribute(torch.backends.cudnn, 'deterministic'), True),
        'torch.backends.cudnn.benchmark': (
            *_attribute(torch.backends.cudnn, 'benchmark'), True),
        'torch.get_float32_matmul_precision()': (
            torch.get_float32_matmul_precision,
            torch.set_float32_matmul_precision, True),
    }
    for name, obj, attr in _precision_switches():
        items[name] = (*_attribute(obj, attr), True)
    items['torch.distributed default process group'] = (
        lambda: dist.is_available() and dist.is_initialized(),
        _set_process_group, True)
    items['mmengine DefaultScope (current instance)'] = (
        _get_default_scopes, _set_default_scopes, False)
    items['multiprocessing start method'] = (
        lambda: multiprocessing.get_start_method(allow_none=True),
        lambda method: multiprocessing.set_start_method(method, force=True),
        False)
    if 'cv2' in sys.modules:  # never imported here just for this
        cv2 = sys.modules['cv2']
        items['cv2.getNumThreads()'] = (cv2.getNumThreads, cv2.setNumThreads,
                                        False)
    return items


def _set_process_group(initialized: bool) -> None:
    """Only a group a test left behind can be undone (destroyed)."""
    if not initialized and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _default_scope_class():
    module = sys.modules.get('mmengine.registry.default_scope')
    return getattr(module, 'DefaultScope', None)


def _get_default_scopes():
    """The instances of MMEngine's ``DefaultScope`` in creation order (the
    last one is current; none before MMEngine's registry is imported)."""
    scope = _default_scope_class()
    return () if scope is None else tuple(scope._instance_dict.items())


def _set_default_scopes(instances) -> None:
    scope = _default_scope_class()
    if scope is None:
        return
    scope._instance_dict.clear()
    scope._instance_dict.update(instances)


def _snapshot(items) -> Dict[str, Any]:
    return {name: get() for name, (get, _, _) in items.items()}


def _restore(before: Dict[str, Any], items) -> List[str]:
    """Put back what differs from ``before``; the strict items that did, as
    ``'name: before -> after'``."""
    items.update({k: v for k, v in _state_items().items() if k not in items})
    after = _snapshot(items)
    changed = [name for name in items
               if name in before and after[name] != before[name]]
    still = changed
    for _ in range(3):  # a setter may move another switch (TF32 settings)
        for name in still:
            items[name][1](before[name])
        restored = _snapshot(items)
        still = [name for name in before if restored[name] != before[name]]
        if not still:
            break
    assert not still, f'could not restore {still}'
    return [f'{name}: {before[name]!r} -> {after[name]!r}'
            for name in changed if items[name][2]]


@pytest.fixture(autouse=True, scope='module')
def _module_state_is_restored(request):
    """The same for a test module as a whole (its module-scoped fixtures,
    torn down after its last test): a leak fails that last test's teardown."""
    items = _state_items()
    before = _snapshot(items)
    yield
    leaked = _restore(before, items)
    if leaked:
        pytest.fail(f'{request.node.nodeid} (module fixtures) left process-wide '
                    f'state changed (restored now): {"; ".join(leaked)}',
                    pytrace=False)


@pytest.fixture(autouse=True)
def _global_state_is_restored(request):
    """Snapshot the process-wide state, run the test, restore the state; fail
    the test if it changed a strict item (see the module docstring)."""
    items = _state_items()
    before = _snapshot(items)
    yield
    leaked = _restore(before, items)
    if leaked:
        pytest.fail(f'{request.node.nodeid} left process-wide state changed '
                    f'(restored now): {"; ".join(leaked)}', pytrace=False)
