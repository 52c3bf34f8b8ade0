"""Check an existing OpenMMLab environment for cenet-mmdet; install nothing.

The second set-up route (docs/gpu.md): a user who already has torch with
CUDA, mmcv with its compiled ops and mmdet 3.x installs only the plugin,

    pip install -v --no-deps -e .       # --no-deps: torch is never reinstalled
    python tools/gpu/check_env.py       # versions, mmcv's ops, the plugin

and this script says whether that environment is one the plugin supports:

* Python, torch (its CUDA build, the GPUs it sees, cuDNN), mmengine 0.10.x,
  mmcv >=2.0,<2.2 with its compiled ops (``mmcv._ext``), mmdet 3.x,
  pycocotools, and ``import cenet_mmdet``;
* mmcv's CUDA ops: the CUDA version mmcv was compiled with, and, where a GPU
  is visible, ``nms`` and ``RoIAlign`` run on CUDA tensors (Mask R-CNN's RoI
  heads need them);
* ``--requirements NAME...``: every requirement that these installed
  distributions declare is installed, in a version they accept (an
  ``opencv-python`` requirement is met by any OpenCV distribution, e.g.
  ``opencv-python-headless``). The offline GPU kit uses this on the node.

Exit status 0 when everything checked is fine, 1 otherwise (one line per
problem, with what to do), 2 for ``--require-cuda`` without a usable GPU or
mmcv CUDA ops. It never installs, upgrades or removes anything.
"""
import argparse
import importlib
import importlib.metadata as metadata
import importlib.util
import json
import platform
import re
import sys
from typing import Dict, List, Optional, Tuple

#: name: (lowest, highest excluded) versions the plugin supports
SUPPORTED = {
    'torch': ('1.13', '3'),
    'mmengine': ('0.10.0', '0.11.0'),
    'mmcv': ('2.0.0', '2.2.0'),
    'mmdet': ('3.0.0', '4.0.0'),
}
#: a requirement on one of these is met by any of them
ALIASES = [{'opencv-python', 'opencv-python-headless', 'opencv-contrib-python',
            'opencv-contrib-python-headless'}]
INSTALL_HINT = ('pip install -v --no-deps -e .  (in the cenet-mmdet checkout; '
                '--no-deps keeps your torch)')


def version_tuple(version: str) -> Tuple[int, ...]:
    parts = []
    for part in re.split(r'[.+]', version):
        match = re.match(r'\d+', part)
        if not match:
            break
        parts.append(int(match.group()))
    return tuple(parts)


class Report:
    """Lines of ``name: value`` and the problems found."""

    def __init__(self) -> None:
        self.facts: Dict[str, str] = {}
        self.problems: List[str] = []

    def fact(self, name: str, value: str) -> None:
        self.facts[name] = value
        print(f'{name:<22} {value}')

    def problem(self, text: str) -> None:
        self.problems.append(text)
        print(f'PROBLEM: {text}')


def check_versions(report: Report) -> Optional[object]:
    report.fact('python', f'{platform.python_version()} ({sys.executable})')
    torch = None
    for name, (low, high) in SUPPORTED.items():
        if importlib.util.find_spec(name) is None:
            report.fact(name, 'not installed')
            report.problem(f'{name} >={low},<{high} is not installed')
            continue
        try:
            module = importlib.import_module(name)
        except Exception as error:  # a broken install: say so, go on
            report.fact(name, f'import failed: {error}')
            report.problem(f'{name} does not import: {error}')
            continue
        version = getattr(module, '__version__', '0')
        where = getattr(module, '__file__', '?')
        report.fact(name, f'{version} ({where})')
        if not version_tuple(low) <= version_tuple(version) < version_tuple(high):
            report.problem(f'{name} {version} is outside the supported >={low},<{high}')
        if name == 'torch':
            torch = module
    if importlib.util.find_spec('pycocotools') is None:
        report.problem('pycocotools is not installed (COCO evaluation)')
    return torch


def check_torch_cuda(report: Report, torch) -> bool:
    """The CUDA build of torch and the GPUs it sees; True if one is usable."""
    report.fact('torch CUDA build', str(torch.version.cuda))
    cudnn = (torch.backends.cudnn.version()
             if torch.backends.cudnn.is_available() else None)
    report.fact('cuDNN', str(cudnn))
    if not torch.cuda.is_available():
        report.fact('GPUs', 'none visible (torch.cuda.is_available() is False)')
        return False
    names = []
    for index in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(index)
        names.append(f'{props.name} ({props.total_memory / 2**30:.0f} GiB, '
                     f'capability {props.major}.{props.minor})')
    report.fact('GPUs', '; '.join(names))
    return True


def check_mmcv_ops(report: Report, torch, cuda: bool) -> bool:
    """mmcv's compiled ops; True if its CUDA ops ran on the GPU."""
    if importlib.util.find_spec('mmcv') is None:
        return False
    try:
        from mmcv.ops import RoIAlign, get_compiling_cuda_version, nms
    except Exception as error:
        report.fact('mmcv ops', f'missing ({error})')
        report.problem('mmcv has no compiled ops (mmcv._ext), so nothing of '
                       'mmdet.models or the plugin imports: build mmcv 2.1.0 '
                       'from source with MMCV_WITH_OPS=1 (FORCE_CUDA=1 for its '
                       'CUDA ops), see docs/gpu.md')
        return False
    compiled = get_compiling_cuda_version()
    report.fact('mmcv ops', f'compiled; CUDA ops compiled with CUDA: {compiled}')
    if compiled == 'not available':
        if cuda:
            report.problem('mmcv was built without CUDA ops: Mask R-CNN cannot '
                           'run its RoI heads on the GPU; rebuild it with '
                           'FORCE_CUDA=1 (docs/gpu.md)')
        return False
    if not cuda:
        return False
    try:
        boxes = torch.tensor([[0., 0., 10., 10.], [1., 1., 10., 10.],
                              [20., 20., 30., 30.]], device='cuda')
        scores = torch.tensor([0.9, 0.8, 0.7], device='cuda')
        _, keep = nms(boxes, scores, 0.5)
        feats = torch.arange(2 * 4 * 8 * 8, dtype=torch.float32,
                             device='cuda').reshape(2, 4, 8, 8)
        rois = torch.tensor([[0, 0., 0., 7., 7.], [1, 2., 2., 6., 6.]], device='cuda')
        pooled = RoIAlign((2, 2), 1.0, 2)(feats, rois)
        ok = (sorted(keep.tolist()) == [0, 2] and tuple(pooled.shape) == (2, 4, 2, 2)
              and bool(torch.isfinite(pooled).all()))
    except Exception as error:
        report.problem(f'mmcv CUDA ops fail on the GPU: {error}')
        return False
    if not ok:
        report.problem('mmcv CUDA ops ran but gave wrong results (nms/RoIAlign)')
        return False
    report.fact('mmcv CUDA ops', 'nms and RoIAlign ran on the GPU')
    return True


def check_plugin(report: Report) -> None:
    try:
        import cenet_mmdet
    except Exception as error:
        report.fact('cenet_mmdet', f'import failed: {error}')
        if importlib.util.find_spec('cenet_mmdet') is None:
            report.problem(f'cenet_mmdet is not installed: {INSTALL_HINT}')
        else:
            report.problem(f'cenet_mmdet does not import: {error}')
        return
    report.fact('cenet_mmdet', f'{cenet_mmdet.__version__} ({cenet_mmdet.__file__})')


def normalize(name: str) -> str:
    return re.sub(r'[-_.]+', '-', name).lower()


def installed_versions() -> Dict[str, str]:
    found = {}
    for dist in metadata.distributions():
        name = dist.metadata['Name']
        if name:
            found.setdefault(normalize(name), dist.version)
    return found


def unmet_requirements(names: List[str]) -> List[str]:
    """The requirements of the installed distributions ``names`` that are
    missing or in a version they do not accept (markers evaluated, extras
    ignored)."""
    try:
        from packaging.requirements import Requirement
    except ImportError:  # presence only
        Requirement = None
    installed = installed_versions()
    unmet = []
    for name in names:
        try:
            requires = metadata.requires(name) or []
        except metadata.PackageNotFoundError:
            unmet.append(f'{name} (not installed)')
            continue
        for text in requires:
            if Requirement is None:
                req_name = re.split(r'[\s;<>=!~\[(]', text, maxsplit=1)[0]
                if 'extra ==' in text:
                    continue
                candidates = next((a for a in ALIASES if normalize(req_name) in a),
                                  {normalize(req_name)})
                if not any(c in installed for c in candidates):
                    unmet.append(f'{text} (needed by {name}): missing')
                continue
            req = Requirement(text)
            if req.marker is not None and not req.marker.evaluate({'extra': ''}):
                continue
            wanted = normalize(req.name)
            candidates = next((a for a in ALIASES if wanted in a), {wanted})
            have = [(c, installed[c]) for c in sorted(candidates) if c in installed]
            if not have:
                unmet.append(f'{req} (needed by {name}): missing')
            elif not any(req.specifier.contains(v, prereleases=True) for _, v in have):
                unmet.append(f'{req} (needed by {name}): found '
                             + ', '.join(f'{c} {v}' for c, v in have))
    return unmet


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--require-cuda', action='store_true',
                        help='exit 2 unless a GPU is visible and mmcv CUDA ops run on it')
    parser.add_argument('--requirements', nargs='+', metavar='NAME',
                        help='only check the declared requirements of these '
                        'installed distributions')
    parser.add_argument('--json', help='also write the facts and problems here')
    args = parser.parse_args(argv)
    report = Report()
    if args.requirements:
        for line in unmet_requirements(args.requirements):
            report.problem(f'unmet requirement: {line}')
        if not report.problems:
            print(f'requirements of {len(args.requirements)} distributions: all met')
        cuda_ops = cuda = False
    else:
        torch = check_versions(report)
        cuda = cuda_ops = False
        if torch is not None:
            cuda = check_torch_cuda(report, torch)
            cuda_ops = check_mmcv_ops(report, torch, cuda)
        check_plugin(report)
    if args.json:
        with open(args.json, 'w') as f:
            json.dump(dict(facts=report.facts, problems=report.problems), f, indent=1)
    if report.problems:
        print(f'{len(report.problems)} problem(s): see the PROBLEM lines above')
        return 1
    if args.require_cuda and not (cuda and cuda_ops):
        print('no usable GPU with mmcv CUDA ops (--require-cuda)')
        return 2
    if not args.requirements:
        print('environment OK' + ('' if cuda_ops else
                                  ' (no GPU use checked: no GPU or no mmcv CUDA ops)'))
    return 0


if __name__ == '__main__':
    sys.exit(main())
