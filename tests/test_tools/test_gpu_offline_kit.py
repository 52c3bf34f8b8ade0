"""The offline GPU-check kit's logic, cheaply (no download, no build).

* tools/gpu/prepare_offline.sh --dry-run: the pip commands target the asked
  Python (wheels only, manylinux), pin mmengine/mmdet, fetch mmcv 2.1.0 as a
  source distribution, never ask for torch, and write nothing;
* kit_manifest.select: which resolved distributions go into the kit;
* run_offline_check.sh, sourced: the build-time model and the CPU/CUDA
  decision, the build-log progress; executed: its refusals (not a kit, the
  wrong Python, no CUDA device) before anything is installed;
* check_env.py: unmet requirements, an OpenCV alias, versions outside range.

The whole flow (a kit installed offline into a fresh environment, mmcv built
there) is run by hand: 1399 s on 2 cores on 2026-12-02, the mmcv build
sharing the cores with another job (docs/dev/gpu-offline-kit.md).
"""
import importlib.util
import json
import os
import os.path as osp
import re
import shlex
import subprocess
import sys

import pytest

REPO = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
GPU = osp.join(REPO, 'tools', 'gpu')
PREPARE = osp.join(GPU, 'prepare_offline.sh')
RUNNER = osp.join(GPU, 'run_offline_check.sh')


def load(name: str):
    spec = importlib.util.spec_from_file_location(f'_kit_{name}', osp.join(GPU, f'{name}.py'))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


MANIFEST = load('kit_manifest')
CHECK_ENV = load('check_env')


def prepare_dry_run(tmp_path, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, CENET_KIT_PIP_PYTHON=sys.executable)
    return subprocess.run(['bash', PREPARE, '--dry-run', '--out', str(tmp_path / 'kit'),
                           *args], capture_output=True, text=True, timeout=60, env=env)


def commands(stdout: str):
    return [shlex.split(line[2:]) for line in stdout.splitlines() if line.startswith('+ ')]


@pytest.mark.parametrize('python', ['3.12', '3.11'])
def test_prepare_dry_run_targets_the_asked_python(tmp_path, python):
    proc = prepare_dry_run(tmp_path, '--python', python)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert not (tmp_path / 'kit').exists()  # nothing written
    resolve, _, download, _, sdist, *_ = [c for c in commands(proc.stdout)
                                          if 'pip' in c or 'kit_manifest.py' in ' '.join(c)
                                          or c[:1] == ['echo']]
    for argv in (resolve, download):
        assert argv[argv.index('--python-version') + 1] == python
        assert '--only-binary=:all:' in argv and '--implementation' in argv
        platforms = [argv[i + 1] for i, a in enumerate(argv) if a == '--platform']
        assert 'manylinux_2_28_x86_64' in platforms and 'manylinux2014_x86_64' in platforms
        assert not any('2_3' in p for p in platforms)  # glibc <= 2.28 assumed
    assert '--dry-run' in resolve and '--report' in resolve and '--ignore-installed' in resolve
    wanted = resolve[resolve.index('--only-binary=:all:') + 1:]
    assert wanted == ['mmengine==0.10.7', 'mmdet==3.3.0', 'pycocotools',
                      'setuptools>=77,<82', 'wheel', 'ninja', 'pytest']
    assert '--no-deps' in download
    assert sdist[sdist.index('download') + 1:] == [
        '--disable-pip-version-check', '--no-deps', '--no-binary=:all:', '-d',
        str(tmp_path / 'kit' / 'sdist'), 'mmcv==2.1.0']
    assert sdist[1].startswith('PIP_CONSTRAINT=')
    assert not any(a.startswith(('torch', 'triton')) for c in commands(proc.stdout) for a in c)
    assert f'kit for CPython {python} (cp{python.replace(".", "")}' in proc.stdout


def test_prepare_refuses_a_bad_python_and_a_foreign_folder(tmp_path):
    proc = prepare_dry_run(tmp_path, '--python', '3')
    assert proc.returncode == 2 and 'MAJOR.MINOR' in proc.stderr
    (tmp_path / 'kit').mkdir()
    (tmp_path / 'kit' / 'precious.txt').write_text('x')
    proc = prepare_dry_run(tmp_path)
    assert proc.returncode == 2 and 'is not a kit' in proc.stderr
    assert (tmp_path / 'kit' / 'precious.txt').exists()


def report(*names_versions):
    return dict(install=[dict(metadata=dict(name=n, version=v),
                              download_info=dict(url=f'https://x/{n}-{v}-py3-none-any.whl'))
                         for n, v in names_versions])


def test_manifest_keeps_what_the_node_lacks():
    resolved = report(('mmengine', '0.10.7'), ('PyYAML', '6.0'), ('torch', '2.11.0'),
                      ('nvidia-cublas', '13.0'), ('Shapely', '2.2.0'), ('opencv-python', '5.0'),
                      ('termcolor', '3.3.0'), ('numpy', '2.4'))
    kept, dropped = MANIFEST.select(resolved, MANIFEST.DEFAULT_NODE_HAS)
    # the pure-Python requirements and the small compiled ones go in
    assert [k['name'] for k in kept] == ['mmengine', 'pyyaml', 'shapely', 'termcolor']
    assert kept[0]['filename'] == 'mmengine-0.10.7-py3-none-any.whl'
    assert dict(dropped) == {
        'opencv-python': 'assumed on the node', 'numpy': 'assumed on the node',
        'torch': "never in the kit: the node's own torch stack is used",
        'nvidia-cublas': "never in the kit: the node's own torch stack is used"}
    # a bare node: everything but the torch stack goes in
    kept, _ = MANIFEST.select(resolved, [])
    assert [k['name'] for k in kept] == ['mmengine', 'pyyaml', 'shapely', 'opencv-python',
                                         'termcolor', 'numpy']


def test_manifest_cli(tmp_path):
    path = tmp_path / 'report.json'
    path.write_text(json.dumps(report(('mmdet', '3.3.0'), ('scipy', '1.17'))))
    proc = subprocess.run([sys.executable, osp.join(GPU, 'kit_manifest.py'), 'select',
                           str(path), '--node-has', 'scipy'], capture_output=True, text=True)
    assert proc.stdout == 'mmdet==3.3.0\n'
    assert proc.stderr == 'dropped scipy: assumed on the node\n'


def source_runner(tmp_path, body: str) -> subprocess.CompletedProcess:
    program = f'source {shlex.quote(RUNNER)}\n{body}\n'
    return subprocess.run(['bash', '-c', program], capture_output=True, text=True,
                          timeout=60, env=dict(os.environ, MAX_JOBS='16'))


@pytest.mark.parametrize('jobs,setting,possible,arches,mode,why', [
    (16, 'auto', 1, '9.0', 'cpu', 'CUDA ops not built: their estimated build, 212 s on 16 cores'),
    (64, 'auto', 1, '9.0', 'cuda', 'estimated 64 s on 64 cores + 420 s of checks fit'),
    (16, '1', 1, '9.0', 'cuda', 'CENET_MMCV_CUDA=1'),
    (64, '0', 1, '9.0', 'cpu', 'CENET_MMCV_CUDA=0'),
    (64, 'auto', 0, '', 'cpu', 'no nvcc here'),
    (64, '1', 0, '', 'cpu', 'no nvcc here'),
    (64, 'auto', 1, '8.0;9.0', 'cuda', 'estimated 91 s on 64 cores'),
])
def test_mmcv_build_decision(tmp_path, jobs, setting, possible, arches, mode, why):
    proc = source_runner(tmp_path, f'JOBS={jobs}; MMCV_CUDA={setting}; CUDA_POSSIBLE={possible}\n'
                                   f'ARCH_LIST="{arches}"; CUDA_WHY="no nvcc here"\n'
                                   'decide_mmcv_build\n'
                                   'echo "$BUILD_MODE|$BUILD_WHY|$EST_CPU_S|$EST_CUDA_S"')
    assert proc.returncode == 0, proc.stderr
    got_mode, got_why, est_cpu, est_cuda = proc.stdout.strip().split('|')
    assert got_mode == mode and got_why.startswith(why), proc.stdout
    cpp, cu, link = 18, 30, 15  # the model's defaults
    n_arch = max(1, len(arches.split(';')))
    assert int(est_cpu) == int(77 * cpp / jobs + link + 0.5)
    assert int(est_cuda) == int((78 * cpp + 58 * cu * n_arch) / jobs + link + 0.5)


def test_sixteen_cores_estimates(tmp_path):
    """The numbers docs/dev/gpu-offline-kit.md quotes for a 16-core node."""
    proc = source_runner(tmp_path, 'echo "$(est_build_s 77 0) $(est_build_s 78 58)"')
    assert proc.stdout.split() == ['102', '212']


def test_build_log_progress(tmp_path):
    log = tmp_path / 'build.log'
    log.write_text('running build_ext\n[1/77] c++ -c a.cpp\n  [12/77] c++ -c b.cpp\n'
                   'warning: [13/77] is not a counter here\n')
    proc = source_runner(tmp_path, f'last_progress {log}; last_progress {tmp_path}/none')
    assert proc.stdout == '12/77\n'  # and nothing for a missing log


def fake_kit(tmp_path, python: str) -> str:
    kit = tmp_path / 'kit'
    kit.mkdir()
    (kit / 'run_offline_check.sh').write_text(open(RUNNER).read())
    (kit / 'kit.env').write_text(f'KIT_PYTHON={python}\nKIT_DISTS="mmengine"\n')
    return str(kit)


def run_runner(kit: str, tmp_path, **env: str) -> subprocess.CompletedProcess:
    full = dict(os.environ, CENET_NODE_PYTHON=sys.executable, CUDA_VISIBLE_DEVICES='',
                CENET_GPU_CHECK_OUT=str(tmp_path / 'out'))
    full.pop('CENET_GPU_CHECK_WITHOUT_CUDA', None)
    full.update(env)
    return subprocess.run(['bash', osp.join(kit, 'run_offline_check.sh')], env=full,
                          capture_output=True, text=True, timeout=120)


def this_python() -> str:
    return '%d.%d' % sys.version_info[:2]


def test_runner_starts_the_gpu_check_by_its_path_in_the_source():
    """The runner runs the GPU check from the kit's source snapshot (this
    repository as it is): the path it names exists here."""
    with open(RUNNER) as f:
        called = re.findall(r'"\$src_dir/(tools/[\w/.-]+)"', f.read())
    assert called == ['tools/gpu/gpu_check.sh']
    assert osp.isfile(osp.join(REPO, called[0]))


def test_runner_refuses_a_folder_that_is_not_a_kit(tmp_path):
    kit = fake_kit(tmp_path, this_python())
    os.remove(osp.join(kit, 'kit.env'))
    proc = run_runner(kit, tmp_path)
    assert proc.returncode == 2
    assert 'has no kit.env: not a kit' in proc.stdout + proc.stderr


def test_runner_refuses_another_python(tmp_path):
    proc = run_runner(fake_kit(tmp_path, '3.99'), tmp_path)
    assert proc.returncode == 2
    text = proc.stdout + proc.stderr
    assert f'the kit is for Python 3.99, {sys.executable} is {this_python()}' in text
    assert f'prepare_offline.sh --python {this_python()}' in text


def test_runner_refuses_without_cuda_before_installing(tmp_path):
    proc = run_runner(fake_kit(tmp_path, this_python()), tmp_path,
                      TMPDIR=str(tmp_path / 'tmp'))
    assert proc.returncode == 2
    text = proc.stdout + proc.stderr
    assert 'no CUDA device' in text and 'nothing was installed or built' in text
    assert 'CENET_GPU_CHECK_WITHOUT_CUDA=1' in text
    assert not (tmp_path / 'tmp').exists()  # no work folder, no venv
    assert 'no CUDA device' in (tmp_path / 'out' / 'offline_check.log').read_text()


def test_requirements_check_with_an_opencv_alias(monkeypatch):
    requires = {'mmengine': ['addict', 'opencv-python>=3', 'numpy', 'regex; sys_platform == "win32"',
                             'pytest; extra == "tests"'],
                'mmdet': ['scipy>=9']}
    monkeypatch.setattr(CHECK_ENV.metadata, 'requires', lambda name: requires[name])
    monkeypatch.setattr(CHECK_ENV, 'installed_versions', lambda: {
        'addict': '2.4.0', 'opencv-python-headless': '4.10.0', 'numpy': '2.5.2',
        'scipy': '1.17.1'})
    assert CHECK_ENV.unmet_requirements(['mmengine', 'mmdet']) == [
        'scipy>=9 (needed by mmdet): found scipy 1.17.1']
    monkeypatch.setattr(CHECK_ENV, 'installed_versions', lambda: {'numpy': '2.5.2'})
    assert CHECK_ENV.unmet_requirements(['mmengine']) == [
        'addict (needed by mmengine): missing', 'opencv-python>=3 (needed by mmengine): missing']


def test_check_env_in_this_environment(tmp_path):
    """This machine's environment (CPU torch, mmcv with CPU ops): fine, with
    no GPU use checked; --require-cuda says no."""
    out = tmp_path / 'env.json'
    proc = subprocess.run([sys.executable, osp.join(GPU, 'check_env.py'), '--json', str(out)],
                          capture_output=True, text=True, timeout=120, cwd='/')
    facts = json.loads(out.read_text())['facts']
    assert facts['mmcv ops'].startswith('compiled; CUDA ops compiled with CUDA: ')
    assert facts['cenet_mmdet'].startswith('0.')
    if 'GPUs' in facts and facts['GPUs'].startswith('none visible'):
        assert proc.returncode == 0, proc.stdout
        assert 'environment OK (no GPU use checked' in proc.stdout
        proc = subprocess.run([sys.executable, osp.join(GPU, 'check_env.py'), '--require-cuda'],
                              capture_output=True, text=True, timeout=120, cwd='/')
        assert proc.returncode == 2


def test_check_env_flags_an_unsupported_version(monkeypatch, capsys):
    report_ = CHECK_ENV.Report()
    import mmengine
    monkeypatch.setattr(mmengine, '__version__', '0.11.1')
    CHECK_ENV.check_versions(report_)
    assert report_.problems == ['mmengine 0.11.1 is outside the supported >=0.10.0,<0.11.0']
