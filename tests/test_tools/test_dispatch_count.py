"""The op counts of docs/performance.md ("Ops per CE layer") are what
``tools/benchmarks/dispatch_count.py`` counts now: a change that adds ops to a
CE layer (GPU kernel launches) shows here."""
import os.path as osp
import re
import sys

import pytest

from cenet_mmdet.testing.scripts import load_script

REPO = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
PAGE = osp.join(REPO, 'docs', 'performance.md')


@pytest.fixture(scope='module')
def tool():
    module = load_script(osp.join(REPO, 'tools', 'benchmarks', 'dispatch_count.py'),
                         'dispatch_count')
    # SyncCE's count runs in spawned processes, which find it by its file
    sys.modules['dispatch_count'] = module
    yield module
    sys.modules.pop('dispatch_count', None)


def documented(first_header: str):
    """``{row: {mode: (ops, total)}}`` of the table whose first header cell is
    ``first_header``, in the section "Ops per CE layer"."""
    with open(PAGE) as f:
        page = f.read()
    section = page[page.index('\n## Ops per CE layer\n'):]
    section = section[:section.index('\n## ', 1)]
    rows, inside = {}, False
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip('|').split('|')]
        if line.startswith('|') and cells[0] == first_header:
            inside = True
            continue
        if not line.startswith('|'):
            inside = False
        if inside and not cells[0].startswith('---'):
            counts = [tuple(int(v) for v in re.fullmatch(r'(\d+) \((\d+)\)', c).groups())
                      for c in cells[1:]]
            rows[cells[0]] = dict(zip(('train', 'frozen', 'eval'), counts))
    assert rows, f'no table "{first_header}" in {PAGE}'
    return rows


def test_layer_counts_are_documented(tool):
    table = tool.layer_table(sync=True)
    expected = documented('layer')
    assert set(table) == set(expected)
    for layer, row in table.items():
        for mode, (total, ops) in row.items():
            assert (ops, total) == expected[layer][mode], (layer, mode)


def test_backbone_counts_are_documented(tool):
    expected = documented('backbone (base_channels 16, 64 px)')
    for mode in ('train', 'frozen', 'eval'):
        for name, (total, ops) in tool.count_resnet(mode).items():
            assert (ops, total) == expected[name][mode], (name, mode)


def test_the_targets_hold(tool):
    """CE over BN, ops without views: a frozen layer at most 40, eval at most
    20 (GPU launch cost)."""
    row = documented('layer')['CE']
    assert row['frozen'][0] <= 40 and row['eval'][0] <= 20
