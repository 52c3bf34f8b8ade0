"""The user pages state today's truth, and the README's first screen is the
GPU user's path.

* The user pages (``USER_PAGES``: README.md, docs/*.md but the changelog,
  configs/cenet/README.md, tools/README.md, the metafile and model-index.yml)
  name no commit hash, no issue number and no time of day of a run, and do
  not narrate dropped or superseded work. History belongs to
  docs/changelog.md and git; developers' notes to docs/dev/.
* The README's first 80 lines hold the four steps of a detection user with
  GPUs, in order: install (into an existing environment, or a fresh one),
  the checkpoint (where the authors publish it, the file, the converter),
  8-GPU training, and 8-GPU testing with the metrics to read.

Runs in well under a second: it reads text only.
"""
import os.path as osp
import re
from glob import glob
from typing import List

import pytest

REPO = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
USER_PAGES = sorted(
    ['README.md', 'configs/cenet/README.md', 'configs/cenet/metafile.yml',
     'model-index.yml', 'tools/README.md']
    + [osp.relpath(p, REPO) for p in glob(osp.join(REPO, 'docs', '*.md'))
       if osp.basename(p) != 'changelog.md'])
#: what a page that states today's truth does not hold
HISTORY = {
    # 7-40 hex digits with at least one digit and one letter: a git hash
    'a commit hash': re.compile(
        r'(?<![\w./-])(?=[0-9a-f]*[0-9])(?=[0-9a-f]*[a-f])[0-9a-f]{7,40}(?![\w/-])'),
    'an issue number': re.compile(r'\bissues?\s*#?\d+', re.IGNORECASE),
    'a time of day of a run': re.compile(r'\b\d{1,2}:\d{2}(?::\d{2})?\s*UTC\b'),
    'a diary word': re.compile(
        r'\b(throwaway|this session|kept for the record|superseded)\b',
        re.IGNORECASE),
}
#: the README's first screen
FIRST_SCREEN = 80
#: the four steps of the user's path, each as the strings that must appear
#: in it; the steps appear in this order (by their first string)
USER_PATH = [
    ('install', ['pip install -v --no-deps -e .', 'python tools/gpu/check_env.py',
                 'bash tools/setup_env.sh']),
    ('checkpoint', ['https://github.com/Tangshitao/CENet', 'resnetv1ce50.pth.tar',
                    'python tools/model_converters/cenet2mmdet.py']),
    ('train', ['bash tools/dist_train.sh configs/cenet/mask-rcnn_ce-r50_fpn_2x_coco.py 8']),
    ('test', ['bash tools/dist_test.sh configs/cenet/mask-rcnn_ce-r50_fpn_2x_coco.py',
              'coco/bbox_mAP', 'coco/segm_mAP']),
]


def history_in(text: str) -> List[str]:
    """'line N: what (match)' for every piece of history in ``text``."""
    found = []
    for number, line in enumerate(text.splitlines(), 1):
        for what, pattern in HISTORY.items():
            for match in pattern.finditer(line):
                found.append(f'line {number}: {what} ({match.group(0)})')
    return found


def missing_steps(readme: str) -> List[str]:
    """What the README's first screen lacks of the user's path, or gives out
    of order."""
    screen = '\n'.join(readme.splitlines()[:FIRST_SCREEN])
    problems, last = [], -1
    for step, needles in USER_PATH:
        for needle in needles:
            if needle not in screen:
                problems.append(f'{step}: {needle!r} not in the first '
                                f'{FIRST_SCREEN} lines')
        position = screen.find(needles[0])
        if position >= 0:
            if position < last:
                problems.append(f'{step}: comes before the step above it')
            last = position
    return problems


def _read(page: str) -> str:
    with open(osp.join(REPO, page)) as f:
        return f.read()


def test_user_pages_are_found():
    for page in ('README.md', 'docs/README.md', 'docs/performance.md',
                 'docs/troubleshooting.md', 'configs/cenet/README.md',
                 'tools/README.md'):
        assert page in USER_PAGES
    assert 'docs/changelog.md' not in USER_PAGES
    assert not any(page.startswith('docs/dev/') for page in USER_PAGES)


@pytest.mark.parametrize('page', USER_PAGES)
def test_user_pages_hold_no_history(page):
    found = history_in(_read(page))
    assert not found, f'{page}: ' + '; '.join(found)


def test_history_is_found():
    """Each kind of history is caught; versions, sizes and words are not."""
    assert history_in('measured at commit 8a824fe on the Xeon') == \
        ['line 1: a commit hash (8a824fe)']
    assert history_in('see issue 20 and Issue #21') == \
        ['line 1: an issue number (issue 20)', 'line 1: an issue number (Issue #21)']
    assert history_in('x\nthree runs, 19:18-19:26 UTC') == \
        ['line 2: a time of day of a run (19:26 UTC)']
    assert history_in('a throwaway patch') == ['line 1: a diary word (throwaway)']
    clean = ('mmcv 2.1.0, torch 2.13.0+cu130, sm_90, 1.13x (1.02-1.57), '
             'deadbeef, coco/bbox_mAP, 2026-12-03, CENET_CACHE_DIR, '
             'arxiv.org/abs/2003.00214, a 64-bit build, effaced')
    assert history_in(clean) == []


def test_readme_first_screen_is_the_users_path():
    assert missing_steps(_read('README.md')) == []


def test_missing_or_misplaced_steps_are_found():
    in_order = [needle for _, needles in USER_PATH for needle in needles]
    assert missing_steps('\n'.join(in_order)) == []
    pushed_down = '\n'.join(['filler'] * FIRST_SCREEN + in_order)
    assert len(missing_steps(pushed_down)) == len(in_order)
    no_metrics = [n for n in in_order if n != 'coco/segm_mAP']
    assert missing_steps('\n'.join(no_metrics)) == [
        "test: 'coco/segm_mAP' not in the first 80 lines"]
    train = USER_PATH[2][1]
    test_last = [n for n in in_order if n not in train] + train
    assert missing_steps('\n'.join(test_last)) == [
        'test: comes before the step above it']
