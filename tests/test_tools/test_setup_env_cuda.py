"""tools/setup_env.sh's route choice, in its dry-run mode (nothing installed).

Fake ``nvidia-smi`` and ``nvcc`` scripts on PATH stand in for a GPU machine:
the script must take the CUDA route (torch built for the variant that the
driver and nvcc allow, from the PyTorch index; mmcv built with FORCE_CUDA=1,
TORCH_CUDA_ARCH_LIST of the GPUs, MAX_JOBS, CUDA_HOME of that nvcc; a wheel
cache key naming the variant, nvcc and the architectures), and the CPU route,
with the exact CPU commands CI runs, without a working driver, without nvcc,
or with CENET_CUDA=0. The dry run creates neither the venv nor the cache.
"""
import os
import os.path as osp
import shutil
import subprocess
import sys
from typing import Dict, List, Optional

import pytest

REPO = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
SCRIPT = osp.join(REPO, 'tools', 'setup_env.sh')
PYTHON311 = shutil.which('python3.11') or (
    sys.executable if sys.version_info[:2] == (3, 11) else None)
pytestmark = pytest.mark.skipif(PYTHON311 is None, reason='needs python3.11')


def fake_tools(tmp_path, gpus: Optional[List[str]], driver_cuda: str = '13.0',
               nvcc: Optional[str] = '13.0', smi_works: bool = True) -> Dict[str, str]:
    """A bin folder with nvidia-smi (GPUs as 'name, capability') and a CUDA
    home with bin/nvcc; returns PATH entries and the CUDA home."""
    bin_dir = tmp_path / 'bin'
    bin_dir.mkdir()
    cuda_home = tmp_path / 'cuda'
    if gpus is not None:
        names = '\\n'.join(f'{g.split(", ")[0]}, 580.159.03' for g in gpus)
        caps = '\\n'.join(g.split(', ')[1] for g in gpus)
        body = (f'''case "$*" in
  *name,driver_version*) printf '{names}\\n' ;;
  *compute_cap*) printf '{caps}\\n' ;;
  "") printf '| NVIDIA-SMI 580.159.03  Driver Version: 580.159.03  CUDA Version: {driver_cuda} |\\n' ;;
  *) exit 9 ;;
esac''' if smi_works else
                'echo "NVIDIA-SMI has failed because it could not communicate with the NVIDIA driver."; exit 9')
        (bin_dir / 'nvidia-smi').write_text(f'#!/usr/bin/env bash\n{body}\n')
        (bin_dir / 'nvidia-smi').chmod(0o755)
    path = [str(bin_dir)]
    if nvcc is not None:
        (cuda_home / 'bin').mkdir(parents=True)
        (cuda_home / 'bin' / 'nvcc').write_text(
            '#!/usr/bin/env bash\necho "nvcc: NVIDIA (R) Cuda compiler driver"\n'
            f'echo "Cuda compilation tools, release {nvcc}, V{nvcc}.48"\n')
        (cuda_home / 'bin' / 'nvcc').chmod(0o755)
        path.append(str(cuda_home / 'bin'))
    return dict(path=os.pathsep.join(path), cuda_home=str(cuda_home))


def system_path() -> str:
    """PATH without folders holding an nvcc or nvidia-smi (this machine has
    a CUDA compiler in /usr/local/bin), so that only the fakes are found."""
    keep = [d for d in os.environ['PATH'].split(os.pathsep)
            if d and not any(osp.exists(osp.join(d, tool))
                             for tool in ('nvcc', 'nvidia-smi'))]
    return os.pathsep.join(keep)


def dry_run(tmp_path, extra_path: str = '', use_flag: bool = False,
            **env_extra: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PATH=os.pathsep.join(filter(None, [extra_path, system_path()])),
               CENET_VENV=str(tmp_path / 'venv'), CENET_CACHE_DIR=str(tmp_path / 'cache'),
               PYTHON=PYTHON311, CENET_CUDA_DEFAULT_HOME=str(tmp_path / 'no-cuda'))
    for name in ('MAX_JOBS', 'CENET_CUDA', 'CENET_TORCH_CUDA', 'CUDA_HOME', 'CUDA_PATH',
                 'TORCH_CUDA_ARCH_LIST', 'CENET_TORCH_INDEX_URL', 'CENET_SETUP_DRY_RUN',
                 'CENET_TORCH_CUDA_VARIANTS'):
        env.pop(name, None)
    env.update(env_extra)
    argv = ['bash', SCRIPT] + (['--dry-run'] if use_flag else [])
    if not use_flag:
        env['CENET_SETUP_DRY_RUN'] = '1'
    proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=120,
                          cwd=REPO)
    assert not (tmp_path / 'venv').exists() and not (tmp_path / 'cache').exists()
    return proc


def line(out: str, *parts: str) -> str:
    """The one output line that holds every part."""
    found = [ln for ln in out.splitlines() if all(p in ln for p in parts)]
    assert len(found) == 1, (parts, out)
    return found[0]


def nproc() -> str:
    return subprocess.run(['nproc'], capture_output=True, text=True).stdout.strip()


@pytest.mark.parametrize('use_flag', [True, False])
def test_h200_with_cuda_13_takes_the_cuda_route(tmp_path, use_flag):
    tools = fake_tools(tmp_path, ['NVIDIA H200, 9.0'])
    proc = dry_run(tmp_path, tools['path'], use_flag=use_flag)
    out = proc.stdout
    assert proc.returncode == 0, out + proc.stderr
    route = line(out, '[setup] route:')
    assert route.startswith('[setup] route: cuda (NVIDIA H200 x1, driver 580.159.03 '
                            '(CUDA 13.0), nvcc 13.0')
    assert 'TORCH_CUDA_ARCH_LIST=9.0' in route
    venv_py = f'{tmp_path}/venv/bin/python'
    assert line(out, 'pip install', 'torch==').endswith(
        'torch==2.13.0+cu130 --index-url https://download.pytorch.org/whl/cu130')
    build = line(out, 'pip wheel')
    assert build.startswith(f'[dry-run] MMCV_WITH_OPS=1 FORCE_CUDA=1 '
                            f'CUDA_HOME={tools["cuda_home"]} TORCH_CUDA_ARCH_LIST=9.0 '
                            f'MAX_JOBS={nproc()} {venv_py} -m pip wheel')
    assert 'mmcv==2.1.0' in build and '--no-build-isolation' in build
    key = 'mmcv-2.1.0-torch2.13.0_cu130-cp311-x86_64-nvcc13.0-sm90'
    assert line(out, 'cache the wheel in').endswith(f'{tmp_path}/cache/wheels/{key}')
    assert line(out, 'install', key).split('install --disable-pip-version-check ')[1] \
        .startswith('--force-reinstall --no-deps ')
    assert f'[dry-run] {PYTHON311} -m venv {tmp_path}/venv' in out
    assert 'dry run done (cuda route): nothing was installed or built' in out


def test_two_gpu_kinds_an_older_nvcc_and_max_jobs(tmp_path):
    """Driver CUDA 12.8, nvcc 12.6: torch cu126 (the newest variant <= both
    with nvcc's major version); both GPUs' capabilities; MAX_JOBS kept."""
    tools = fake_tools(tmp_path, ['NVIDIA A100-SXM4-80GB, 8.0', 'NVIDIA A100-SXM4-80GB, 8.0',
                                  'NVIDIA RTX A6000, 8.6'], driver_cuda='12.8', nvcc='12.6')
    proc = dry_run(tmp_path, tools['path'], MAX_JOBS='7')
    out = proc.stdout
    assert proc.returncode == 0, out + proc.stderr
    assert 'NVIDIA A100-SXM4-80GB x2, NVIDIA RTX A6000 x1' in line(out, 'route: cuda')
    assert line(out, 'torch==').endswith('torch==2.13.0+cu126 --index-url '
                                         'https://download.pytorch.org/whl/cu126')
    build = line(out, 'pip wheel')
    assert 'TORCH_CUDA_ARCH_LIST=8.0;8.6 MAX_JOBS=7 ' in build
    assert 'torch2.13.0_cu126-cp311-x86_64-nvcc12.6-sm80_86' in line(out, 'cache the wheel')


@pytest.mark.parametrize('driver,nvcc,variant', [
    ('13.0', '13.0', 'cu130'),
    ('12.4', '12.4', 'cu124'),
    ('13.0', '12.8', 'cu128'),   # nvcc's major version decides
    ('12.8', '12.2', 'cu121'),   # newest variant <= nvcc
    ('12.8', '12.0', 'cu121'),   # none <= nvcc 12.0: the closest above it
])
def test_torch_variant_follows_driver_and_nvcc(tmp_path, driver, nvcc, variant):
    tools = fake_tools(tmp_path, ['NVIDIA H100, 9.0'], driver_cuda=driver, nvcc=nvcc)
    env = dict(CENET_TORCH_CUDA_VARIANTS='cu130 cu128 cu124 cu121') \
        if (driver, nvcc) == ('12.8', '12.0') else {}
    proc = dry_run(tmp_path, tools['path'], **env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert line(proc.stdout, 'torch==').endswith(
        f'torch==2.13.0+{variant} --index-url https://download.pytorch.org/whl/{variant}')


def check_cpu_route(proc: subprocess.CompletedProcess, tmp_path, why: str) -> None:
    """The CPU route's commands, exactly as CI runs them."""
    out = proc.stdout
    assert proc.returncode == 0, out + proc.stderr
    assert line(out, '[setup] route:') == f'[setup] route: cpu ({why})'
    venv_py = f'{tmp_path}/venv/bin/python'
    assert line(out, 'torch==') == (f'[dry-run] {venv_py} -m pip install '
                                    '--disable-pip-version-check torch==2.13.0')
    assert line(out, 'pip wheel') == (
        f'[dry-run] MMCV_WITH_OPS=1 FORCE_CUDA=0 {venv_py} -m pip wheel -v '
        '--no-build-isolation --no-deps mmcv==2.1.0 -w <temporary folder> > '
        f'{tmp_path}/cache/mmcv-build.log')
    assert line(out, 'cache the wheel in').endswith(
        f'{tmp_path}/cache/wheels/mmcv-2.1.0-torch<torch.__version__ after the install>'
        '-cp311-x86_64')
    assert '--force-reinstall' not in out and 'download.pytorch.org' not in out
    assert 'dry run done (cpu route)' in out


def test_cpu_route_without_nvidia_smi(tmp_path):
    check_cpu_route(dry_run(tmp_path), tmp_path, 'no NVIDIA driver (nvidia-smi not found)')


def test_cpu_route_with_the_real_path(tmp_path):
    """What CI's machine finds (no driver there; it has a CUDA compiler)."""
    if shutil.which('nvidia-smi'):
        pytest.skip('this machine has nvidia-smi')
    env = dict(os.environ, CENET_VENV=str(tmp_path / 'venv'),
               CENET_CACHE_DIR=str(tmp_path / 'cache'), PYTHON=PYTHON311,
               CENET_SETUP_DRY_RUN='1')
    for name in ('MAX_JOBS', 'CENET_CUDA'):
        env.pop(name, None)
    proc = subprocess.run(['bash', SCRIPT], env=env, capture_output=True, text=True,
                          timeout=120, cwd=REPO)
    check_cpu_route(proc, tmp_path, 'no NVIDIA driver (nvidia-smi not found)')


def test_cpu_route_when_the_driver_does_not_answer(tmp_path):
    tools = fake_tools(tmp_path, ['NVIDIA H200, 9.0'], smi_works=False)
    check_cpu_route(dry_run(tmp_path, tools['path']), tmp_path,
                    'nvidia-smi lists no GPU (is the driver loaded?)')


def test_cpu_route_without_nvcc(tmp_path):
    tools = fake_tools(tmp_path, ['NVIDIA H200, 9.0'], nvcc=None)
    proc = dry_run(tmp_path, tools['path'])
    assert 'but no nvcc' in line(proc.stdout, 'route: cpu')
    check_cpu_route(proc, tmp_path, line(proc.stdout, 'route: cpu')[len(
        '[setup] route: cpu ('):-1])


def test_nvcc_found_through_cuda_home(tmp_path):
    tools = fake_tools(tmp_path, ['NVIDIA H200, 9.0'])
    bin_only = tools['path'].split(os.pathsep)[0]  # nvidia-smi, not nvcc
    proc = dry_run(tmp_path, bin_only, CUDA_HOME=tools['cuda_home'])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f'CUDA_HOME={tools["cuda_home"]} ' in line(proc.stdout, 'pip wheel')


def test_cenet_cuda_0_forces_the_cpu_route(tmp_path):
    tools = fake_tools(tmp_path, ['NVIDIA H200, 9.0'])
    check_cpu_route(dry_run(tmp_path, tools['path'], CENET_CUDA='0'), tmp_path,
                    'CENET_CUDA=0')


def test_cenet_cuda_1_without_a_gpu_fails_with_the_reason(tmp_path):
    proc = dry_run(tmp_path, CENET_CUDA='1')
    assert proc.returncode == 1
    assert '[setup] FAILED during: choose the route (cpu or cuda)' in proc.stderr
    assert 'CENET_CUDA=1 asks for the cuda route' in proc.stderr
    assert 'no NVIDIA driver (nvidia-smi not found)' in proc.stderr


def test_unknown_argument_is_refused(tmp_path):
    proc = subprocess.run(['bash', SCRIPT, '--dryrun'], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 2 and "unknown argument '--dryrun'" in proc.stderr
