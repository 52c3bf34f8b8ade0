"""Which wheels go into the offline GPU kit (tools/gpu/prepare_offline.sh).

``pip install --dry-run --report`` resolves mmengine, mmdet, pycocotools and
the build tools for the node's Python and platform; this module keeps the
distributions the node is assumed NOT to have, and drops the others:

* never in the kit, whatever is asked: torch and its companions (torchvision,
  torchaudio, triton, the nvidia-* CUDA libraries): the node's own CUDA build
  of torch is what the check is about, and it must not be shadowed;
* dropped by default (:data:`DEFAULT_NODE_HAS`), because the node is
  assumed to have them: the large compiled packages numpy, pillow (both
  required by torchvision), scipy, matplotlib with its compiled requirements
  (contourpy, kiwisolver, fonttools) and OpenCV. Issue #23 asks for the
  pure-Python requirements only, within ~60 MB; the cp312 wheels of
  opencv-python-headless 5.1.0.95 and scipy 1.18.1 alone are 99 MB (64 + 35,
  2026-12-02), numpy, pillow and matplotlib 33 MB more. ``--node-has`` gives
  another list;
* the rest is kept: mmengine, mmdet, pycocotools, shapely, pyyaml and every
  pure-Python requirement (addict, termcolor, yapf, platformdirs, rich,
  pygments, tqdm, six, packaging, pyparsing, python-dateutil, cycler,
  terminaltables, ...), pytest (gpu_check's CUDA tests run with it), and the
  build tools setuptools<82, wheel and ninja.

On the node, ``check_env.py --requirements`` then says which assumed
distribution is missing, if any, before anything is built.

Usage::

    python kit_manifest.py select REPORT.json [--node-has "a b c"]
        prints one ``name==version`` line per kept distribution; the dropped
        ones, with the reason, on stderr
    python kit_manifest.py node-has      prints the default list
"""
import argparse
import json
import re
import sys
from typing import Dict, Iterable, List, Set, Tuple

#: never shipped in the kit (the node's torch stays the one in use)
NEVER = ('torch', 'torchvision', 'torchaudio', 'triton')
NEVER_PREFIXES = ('nvidia-',)

#: assumed on the node: the large compiled requirements of mmengine 0.10.7,
#: mmdet 3.3.0 and pycocotools (numpy and pillow come with torchvision); the
#: node is checked for them (check_env.py --requirements) before any build
DEFAULT_NODE_HAS = (
    'numpy', 'pillow', 'scipy', 'matplotlib', 'contourpy', 'kiwisolver',
    'fonttools', 'opencv-python', 'opencv-python-headless')


def normalize(name: str) -> str:
    """PEP 503 normalized name."""
    return re.sub(r'[-_.]+', '-', name).lower()


def never_shipped(name: str) -> bool:
    name = normalize(name)
    return name in NEVER or name.startswith(NEVER_PREFIXES)


def select(report: Dict, node_has: Iterable[str]) -> Tuple[List[Dict], List[Tuple[str, str]]]:
    """(kept, dropped) of a pip installation report: kept as dicts with
    name, version, url and filename; dropped as (name, reason)."""
    assumed: Set[str] = {normalize(n) for n in node_has}
    kept, dropped = [], []
    for item in report.get('install', []):
        meta = item['metadata']
        name = normalize(meta['name'])
        if never_shipped(name):
            dropped.append((name, "never in the kit: the node's own torch stack is used"))
            continue
        if name in assumed:
            dropped.append((name, 'assumed on the node'))
            continue
        url = item.get('download_info', {}).get('url', '')
        kept.append(dict(name=name, version=meta['version'], url=url,
                         filename=url.rsplit('/', 1)[-1]))
    return kept, dropped


def main(argv: List[str] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    sub = parser.add_subparsers(dest='command', required=True)
    pick = sub.add_parser('select')
    pick.add_argument('report')
    pick.add_argument('--node-has', default=' '.join(DEFAULT_NODE_HAS),
                      help='space-separated names the node has (default: %(default)s)')
    sub.add_parser('node-has')
    args = parser.parse_args(argv)
    if args.command == 'node-has':
        print(' '.join(DEFAULT_NODE_HAS))
        return 0
    with open(args.report) as f:
        report = json.load(f)
    kept, dropped = select(report, args.node_has.split())
    for name, reason in dropped:
        print(f'dropped {name}: {reason}', file=sys.stderr)
    for item in kept:
        print(f"{item['name']}=={item['version']}")
    return 0


if __name__ == '__main__':
    sys.exit(main())
