"""tools/gpu/gpu_check.sh and tools/gpu/cuda_peak.py, on any machine.

* Without CUDA (``CUDA_VISIBLE_DEVICES=''`` forces that on a GPU machine too)
  the script refuses with exit status 2 and a clear message, running nothing.
* ``GPU_CHECK_DRY_RUN=1`` prints the commands: they name existing files, the
  CUDA tests with ``-m cuda``, the benchmarks with ``--device cuda`` and the
  20-iteration AMP training of the SyncCE smoke config.
* Its step runner, key-number parsers and summary, sourced and driven with
  stand-in commands and logs: PASS/FAIL/timeout, exit status, table.
* The CUDA test modules carry the ``cuda`` marker and import without CUDA.
* The steps that need mmcv's CUDA ops (bench_detector, synthetic_data,
  train_amp) are listed as SKIP, with the reason, where mmcv has CPU ops only;
  the compile steps run where their test file / ``--compile`` option exist;
  an mmcv without compiled ops is refused; the summary names the GPU, the
  torch / CUDA / cuDNN versions and mmcv's ops.
"""
import importlib.util
import os
import os.path as osp
import shlex
import subprocess
import sys
from typing import Dict, List

import pytest

REPO = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
SCRIPT = osp.join(REPO, 'tools', 'gpu', 'gpu_check.sh')
PEAK = osp.join(REPO, 'tools', 'gpu', 'cuda_peak.py')
VENV = osp.dirname(osp.dirname(sys.executable))
ROI_STEPS = ['bench_detector', 'synthetic_data', 'train_amp']
STEPS = (['cuda_layers', 'cuda_amp', 'cuda_sync_ce', 'bench_backbones', 'cuda_kernels']
         + ROI_STEPS)
COMPILE_TEST = osp.join(REPO, 'tests', 'test_cuda', 'test_cuda_compile.py')
BENCH = osp.join(REPO, 'tools', 'benchmarks', 'bench_backbones.py')


def has_compile_option(path: str = BENCH) -> bool:
    with open(path) as f:
        text = f.read()
    return "'--compile'" in text or '"--compile"' in text


def expected_steps() -> List[str]:
    """The steps of this checkout: the compile steps where their files exist."""
    return (STEPS + ['cuda_compile'] * osp.exists(COMPILE_TEST)
            + ['bench_compile'] * has_compile_option())


def script_env(tmp_path, **extra: str) -> Dict[str, str]:
    env = dict(os.environ, CENET_VENV=VENV, OUT_DIR=str(tmp_path / 'out'),
               CUDA_VISIBLE_DEVICES='')
    env.pop('GPU_CHECK_DRY_RUN', None)
    env.update(extra)
    return env


def run_script(env: Dict[str, str], timeout: int = 120) -> subprocess.CompletedProcess:
    return subprocess.run(['bash', SCRIPT], env=env, capture_output=True,
                          text=True, timeout=timeout, cwd=REPO)


def test_refuses_without_cuda(tmp_path):
    proc = run_script(script_env(tmp_path))
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert 'no CUDA device' in proc.stderr
    assert 'torch.cuda.is_available() is False' in proc.stderr
    assert not (tmp_path / 'out').exists()  # nothing was run


def test_refuses_without_environment(tmp_path):
    proc = run_script(script_env(tmp_path, CENET_VENV=str(tmp_path / 'none')))
    assert proc.returncode == 2
    assert f'no Python environment at {tmp_path / "none"}' in proc.stderr


def parse_dry_run(stdout: str) -> Dict[str, List[str]]:
    commands = {}
    for line in stdout.splitlines():
        if line.startswith('[dry-run] '):
            head, command = line[len('[dry-run] '):].split(': ', 1)
            commands[head.split()[0]] = shlex.split(command)
    return commands


def parse_skips(stdout: str) -> Dict[str, str]:
    return dict(line[len('[dry-run-skip] '):].split(': ', 1)
                for line in stdout.splitlines() if line.startswith('[dry-run-skip] '))


def dry_run_commands(tmp_path, **extra: str) -> Dict[str, List[str]]:
    proc = run_script(script_env(tmp_path, GPU_CHECK_DRY_RUN='1', **extra))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return parse_dry_run(proc.stdout)


def test_dry_run_names_the_right_files(tmp_path):
    commands = dry_run_commands(tmp_path)
    assert list(commands) == expected_steps()
    python = osp.join(VENV, 'bin', 'python')
    for name, argv in commands.items():
        assert argv[0] == python, name
        for arg in argv[1:]:  # every repository path named exists
            if arg.startswith(('tests/', 'tools/', 'configs/', REPO)):
                path = arg if osp.isabs(arg) else osp.join(REPO, arg)
                assert osp.exists(path) or 'work_dirs' in path, (name, arg)
    for name, test_files in [('cuda_layers', ['test_cuda_ce.py',
                                              'test_cuda_nonfinite.py']),
                             ('cuda_amp', ['test_cuda_amp.py']),
                             ('cuda_sync_ce', ['test_cuda_sync_ce.py'])]:
        argv = commands[name]
        assert argv[1:3] == ['-m', 'pytest'] and '-m' in argv[3:], name
        assert argv[argv.index('-m', 3) + 1] == 'cuda'
        assert argv[-len(test_files):] == [f'tests/test_cuda/{f}' for f in test_files]
    for name in ('bench_backbones', 'bench_detector'):
        argv = commands[name]
        assert argv[1] == 'tools/gpu/cuda_peak.py'
        assert argv[2] == f'tools/benchmarks/{name}.py'
        assert argv[argv.index('--device') + 1] == 'cuda'
    data = commands['synthetic_data']
    assert data[1] == 'tools/misc/make_synthetic_coco.py'
    train = commands['train_amp']
    assert train[1:3] == [osp.join(REPO, 'tools', 'train.py'), osp.join(
        REPO, 'configs', 'cenet', 'smoke', 'mask-rcnn_syncce-r50_fpn_shapes-smoke.py')]
    assert '--amp' in train and 'train_cfg.max_iters=20' in train
    # the data are written where the training runs (relative data_root)
    assert data[2] == osp.join(str(tmp_path / 'out'), 'data_root', 'data',
                               'synthetic_shapes')


def test_dry_run_full_suite_option(tmp_path):
    commands = dry_run_commands(tmp_path, GPU_CHECK_FULL_SUITE='1')
    assert list(commands) == expected_steps() + ['full_suite']
    assert commands['full_suite'][-1] == 'tests'


def source_and_run(tmp_path, body: str) -> subprocess.CompletedProcess:
    """Source the script (functions only) and run ``body`` in that shell."""
    out = tmp_path / 'out'
    out.mkdir(exist_ok=True)
    program = (f'source {shlex.quote(SCRIPT)}\n'
               f'OUT_DIR={shlex.quote(str(out))}\n{body}\n')
    return subprocess.run(['bash', '-c', program], env=script_env(tmp_path),
                          capture_output=True, text=True, timeout=60)


def test_steps_results_and_summary(tmp_path):
    proc = source_and_run(tmp_path, '''
run_step good 30 . bash -c 'echo "3 passed in 1.0s"'; pytest_keys good
run_step bad 30 . bash -c 'echo "1 failed, 2 passed in 1.0s"; exit 1'; pytest_keys bad
run_step skipped 30 . bash -c 'echo "SKIPPED [3] t.py:1: needs a CUDA device"; echo "3 skipped in 0.1s"'; pytest_keys skipped
run_step bf16 30 . bash -c 'echo "SKIPPED [1] t.py:1: no bfloat16 on this GPU"; echo "2 passed, 1 skipped in 0.1s"'; pytest_keys bf16
run_step slow 1 . sleep 20
summary; echo "summary=$?"''')
    out = proc.stdout
    assert '| good | PASS |' in out and '| 3 passed in 1.0s |' in out
    assert '| bad | FAIL (exit 1) |' in out
    assert '| skipped | FAIL (tests skipped) |' in out  # CUDA tests must run
    assert '| bf16 | PASS |' in out  # other skips are fine
    assert '| slow | FAIL (timeout 1s) |' in out
    assert out.rstrip().endswith('summary=1')
    assert (tmp_path / 'out' / 'summary.md').read_text().count('\n| ') == 6
    assert (tmp_path / 'out' / 'bad.log').read_text().startswith('1 failed')


def test_all_passing_steps_give_status_0(tmp_path):
    proc = source_and_run(tmp_path, 'run_step a 30 . true\nsummary; echo "summary=$?"')
    assert '| a | PASS |' in proc.stdout
    assert proc.stdout.rstrip().endswith('summary=0')


def test_spent_budget_fails_the_remaining_steps(tmp_path):
    proc = source_and_run(tmp_path, 'BUDGET_S=5\nrun_step late 30 . true\n'
                                    'summary; echo "summary=$?"')
    assert '| late | FAIL (no time left) |' in proc.stdout
    assert proc.stdout.rstrip().endswith('summary=1')


@pytest.mark.parametrize('loss,result', [('2.3456', 'PASS'), ('nan', 'FAIL'),
                                         ('inf', 'FAIL')])
def test_training_log_needs_a_finite_loss_at_iteration_20(tmp_path, loss, result):
    log = ('Iter(train) [19/20]  lr: 1e-3  memory: 1200  loss: 2.5000  loss_rpn_cls: 0.6\n'
           f'Iter(train) [20/20]  lr: 1e-3  eta: 0:00:00  time: 0.2  '
           f'memory: 1234  loss: {loss}  loss_rpn_cls: 0.5\n'
           'Iter(val) [4/4]  coco/bbox_mAP: 0.0010  coco/segm_mAP: 0.0000\n')
    (tmp_path / 'out').mkdir()
    (tmp_path / 'out' / 'train.log').write_text(log)
    proc = source_and_run(tmp_path, 'RESULT[train]=PASS; train_keys train\n'
                                    'echo "${RESULT[train]} | ${KEYS[train]}"')
    assert proc.stdout.startswith(result), proc.stdout + proc.stderr
    assert (f'iter 20 loss {loss}, memory 1234 MB, bbox mAP 0.0010'
            in proc.stdout)


def test_training_log_without_iteration_20_fails(tmp_path):
    (tmp_path / 'out').mkdir()
    (tmp_path / 'out' / 'train.log').write_text('Iter(train) [4/20]  loss: 2.0\n')
    proc = source_and_run(tmp_path, 'RESULT[train]=PASS; train_keys train\n'
                                    'echo "${RESULT[train]}"')
    assert proc.stdout.startswith('FAIL (no finite loss at iteration 20)')


def test_cuda_peak_runs_the_script_with_its_arguments(tmp_path):
    script = tmp_path / 'tiny.py'
    script.write_text('import sys\nprint("argv", sys.argv[1:])\nsys.exit(3)\n')
    proc = subprocess.run([sys.executable, PEAK, str(script), '--device', 'x'],
                          capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, CUDA_VISIBLE_DEVICES=''))
    assert proc.returncode == 3
    assert "argv ['--device', 'x']" in proc.stdout
    assert 'peak CUDA memory allocated: n/a (CUDA not used)' in proc.stdout


@pytest.mark.parametrize('name', ['test_cuda_ce.py', 'test_cuda_amp.py',
                                  'test_cuda_sync_ce.py', 'test_cuda_nonfinite.py']
                         + ['test_cuda_compile.py'] * osp.exists(COMPILE_TEST))
def test_cuda_test_modules_are_marked_and_import_without_cuda(name):
    path = osp.join(REPO, 'tests', 'test_cuda', name)
    sys.path.insert(0, osp.dirname(path))
    try:
        spec = importlib.util.spec_from_file_location(f'_marked_{name[:-3]}', path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(osp.dirname(path))
    marks = {mark.name for mark in module.pytestmark}
    assert marks == {'cuda', 'skipif'}


def test_script_parses_and_is_bounded():
    assert subprocess.run(['bash', '-n', SCRIPT]).returncode == 0
    with open(SCRIPT) as f:
        text = f.read()
    assert 'set -uo pipefail' in text
    assert 'BUDGET_S="${GPU_CHECK_BUDGET_S:-600}"' in text
    assert '${CENET_VENV:-.venv}' in text


def test_dry_run_without_mmcv_cuda_ops_skips_the_roi_steps(tmp_path):
    """GPU_CHECK_MMCV_CUDA_OPS=0 (an mmcv with CPU ops only): the Mask R-CNN
    steps are listed as SKIP with the caller's reason, the others still run."""
    proc = run_script(script_env(tmp_path, GPU_CHECK_DRY_RUN='1',
                                 GPU_CHECK_MMCV_CUDA_OPS='0',
                                 GPU_CHECK_NO_CUDA_OPS_REASON='no time to build'))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    commands, skips = parse_dry_run(proc.stdout), parse_skips(proc.stdout)
    assert list(commands) == [s for s in expected_steps() if s not in ROI_STEPS]
    for name in ROI_STEPS:
        assert skips[name] == "needs mmcv's CUDA ops (RoI heads): no time to build"


def fake_repo(tmp_path, compile_test: bool, compile_option: bool) -> str:
    """A repository root with (or without) the compile test and option."""
    root = tmp_path / 'repo'
    (root / 'tests' / 'test_cuda').mkdir(parents=True)
    (root / 'tools' / 'benchmarks').mkdir(parents=True)
    if compile_test:
        (root / 'tests' / 'test_cuda' / 'test_cuda_compile.py').write_text('')
    option = ("    parser.add_argument(\n        '--compile', action='store_true')\n"
              if compile_option else "    parser.add_argument('--compiled-kinds')\n")
    (root / 'tools' / 'benchmarks' / 'bench_backbones.py').write_text(option)
    return str(root)


@pytest.mark.parametrize('present', [True, False])
def test_compile_steps_run_only_where_their_files_exist(tmp_path, present):
    root = fake_repo(tmp_path, present, present)
    proc = source_and_run(tmp_path, f'ROOT={shlex.quote(root)}\nDRY_RUN=1\nrun_all')
    commands, skips = parse_dry_run(proc.stdout), parse_skips(proc.stdout)
    if present:
        assert commands['cuda_compile'][-3:] == [
            'cuda', '-rs', 'tests/test_cuda/test_cuda_compile.py']
        bench = commands['bench_compile']
        assert bench[1:3] == ['tools/gpu/cuda_peak.py',
                              'tools/benchmarks/bench_backbones.py']
        assert '--compile' in bench
        assert bench[bench.index('--device') + 1] == 'cuda'
        assert not {'cuda_compile', 'bench_compile'} & set(skips)
    else:
        assert not {'cuda_compile', 'bench_compile'} & set(commands)
        assert skips['cuda_compile'] == 'no tests/test_cuda/test_cuda_compile.py'
        assert skips['bench_compile'] == 'bench_backbones.py has no --compile option'
    assert list(commands)[:4] == STEPS[:4]  # the other steps are unchanged


def test_skipped_steps_are_listed_but_do_not_fail(tmp_path):
    proc = source_and_run(tmp_path, 'run_step a 30 . true\n'
                                    'skip_step b "needs X"\n'
                                    'summary; echo "summary=$?"')
    assert '| a | PASS |' in proc.stdout
    assert '| b | SKIP (needs X) | - |' in proc.stdout
    assert proc.stdout.rstrip().endswith('summary=0')
    proc = source_and_run(tmp_path, 'run_step a 30 . false\nskip_step b "needs X"\n'
                                    'summary; echo "summary=$?"')
    assert proc.stdout.rstrip().endswith('summary=1')


def fake_python(tmp_path, body: str) -> str:
    path = tmp_path / 'fake_python'
    path.write_text(f'#!/usr/bin/env bash\n{body}\n')
    path.chmod(0o755)
    return str(path)


@pytest.mark.parametrize('setting,answer,cuda_ops,why', [
    ('auto', '2.1.0 12.4', '1', ''),
    ('auto', '2.1.0 not available', '0', 'mmcv was built without CUDA ops (given)'),
    ('0', '2.1.0 12.4', '0', 'given'),
    ('1', '2.1.0 not available', '1', ''),
])
def test_mmcv_ops_probe_decides_the_roi_steps(tmp_path, setting, answer, cuda_ops, why):
    python = fake_python(tmp_path, f'echo "a warning" >&2; echo "{answer}"')
    proc = source_and_run(tmp_path, f'PY={python}\nMMCV_CUDA_OPS={setting}\n'
                                    'NO_CUDA_OPS_REASON=given\ncheck_mmcv_ops\n'
                                    'echo "ops=$CUDA_OPS why=$NO_CUDA_OPS_WHY line=$MMCV_LINE"')
    assert proc.returncode == 0, proc.stderr
    version, compiled = answer.split(' ', 1)
    assert proc.stdout.strip() == (f'ops={cuda_ops} why={why} line=mmcv {version}, '
                                   f'ops compiled with CUDA: {compiled}')


def test_mmcv_without_compiled_ops_is_refused(tmp_path):
    python = fake_python(tmp_path, 'echo "ImportError: _ext" >&2; exit 1')
    proc = source_and_run(tmp_path, f'PY={python}\ncheck_mmcv_ops\necho reached')
    assert proc.returncode == 2
    assert 'reached' not in proc.stdout
    assert 'mmcv has no compiled ops' in proc.stderr
    assert 'nothing of the plugin imports' in proc.stderr


def test_summary_header_names_the_machine_and_versions(tmp_path):
    """Without CUDA (CUDA_VISIBLE_DEVICES=''), the header still names torch,
    its CUDA, cuDNN and the driver; with a GPU the same code names each GPU's
    name, count, memory and capability (torch.cuda)."""
    import torch
    proc = source_and_run(tmp_path, 'MMCV_LINE="mmcv 2.1.0, ops compiled with CUDA: 12.4"\n'
                                    f'PY={shlex.quote(sys.executable)}\n'
                                    'run_step a 30 . true\nsummary')
    header = next(line for line in proc.stdout.splitlines()
                  if line.startswith('GPU check, '))
    assert f'torch {torch.__version__}, CUDA {torch.version.cuda}, cuDNN ' in header
    assert 'driver ' in header
    assert 'no CUDA device;' in header
    assert 'mmcv 2.1.0, ops compiled with CUDA: 12.4' in proc.stdout
    assert (tmp_path / 'out' / 'summary.md').read_text().splitlines()[0] == header
