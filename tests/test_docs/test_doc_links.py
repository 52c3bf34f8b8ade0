"""The documentation's links and commands point at things that exist.

* Every relative link (``[text](path)``, ``[text](path#anchor)``,
  ``[text](#anchor)``, images too) in README.md, docs/**/*.md,
  configs/**/README.md and tools/README.md resolves: the file or folder
  exists, and the anchor is a heading of the target page under GitHub's slug
  rules.
* Every repository path named in a fenced code block (``tools/...``,
  ``configs/...``, ``cenet_mmdet/...``, ``docs/...``, ``tests/...``) exists,
  and so does the script of every command in an inline code span
  (``python tools/...py``, ``bash tools/...sh``: tools/README.md lists its
  commands that way). Paths under the folders that the commands *write*
  (``work_dirs/``, ``data/``, ``checkpoints/``, ``gpu_kit/``) are outputs,
  not checked.
* tools/README.md names every script in tools/.
* README.md stays short (at most about 200 lines) and names the two commands
  that ``.ci/run`` runs.

Runs in well under a second: it reads text only.
"""
import os.path as osp
import re
import sys
from glob import glob
from typing import Dict, List, Set, Tuple

import pytest

REPO = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
PAGES = sorted(['README.md', 'tools/README.md']
               + [osp.relpath(p, REPO)
                  for p in glob(osp.join(REPO, 'docs', '**', '*.md'), recursive=True)
                  + glob(osp.join(REPO, 'configs', '**', 'README.md'), recursive=True)])
#: first path components of repository files named in commands (checked)
REPO_DIRS = ('tools', 'configs', 'cenet_mmdet', 'docs', 'tests')
#: first path components of what the commands write (placeholders: not checked)
OUTPUT_DIRS = ('work_dirs', 'data', 'checkpoints', 'gpu_kit')

_FENCE = re.compile(r'^\s*(```|~~~)')
_HEADING = re.compile(r'^(#{1,6})\s+(.*?)\s*#*\s*$')
_CODE_SPAN = re.compile(r'(`+)(.+?)\1')
_LINK = re.compile(r'!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+"[^"]*")?\s*\)')
_PATH = re.compile(r'(?<![\w./$-])((?:\w[\w.-]*/)+[\w.-]*)')
#: the script of a command in an inline code span: ``python tools/x.py ...``
_SPAN_SCRIPT = re.compile(r'^(?:[A-Z_]+=\S*\s+)*(?:python\S*|bash)\s+((?:\w[\w.-]*/)+[\w.-]+)')


def split_page(text: str) -> Tuple[List[str], List[str]]:
    """(prose lines, fenced-code lines) of a markdown text."""
    prose, code, fence = [], [], None
    for line in text.splitlines():
        match = _FENCE.match(line)
        if match and (fence is None or match.group(1) == fence):
            fence = match.group(1) if fence is None else None
            continue
        (code if fence else prose).append(line)
    return prose, code


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: markdown stripped, lower case,
    punctuation dropped (word characters, spaces and hyphens kept), spaces to
    hyphens."""
    text = re.sub(r'!?\[([^\]]*)\]\([^)]*\)', r'\1', heading)   # links -> text
    text = text.replace('`', '')
    text = re.sub(r'(\*\*|__|\*)', '', text)
    text = re.sub(r'<[^>]+>', '', text)                          # inline html
    text = re.sub(r'[^\w\- ]', '', text.strip().lower())
    return text.replace(' ', '-')


def read_page(page: str) -> Tuple[List[str], List[str]]:
    """(prose lines, fenced-code lines) of a page of the repository."""
    with open(osp.join(REPO, page)) as f:
        return split_page(f.read())


def anchors(page: str) -> Set[str]:
    seen: Dict[str, int] = {}
    found = set()
    for line in read_page(page)[0]:
        match = _HEADING.match(line)
        if not match:
            continue
        base = slug(match.group(2))
        count = seen.get(base, 0)
        seen[base] = count + 1
        found.add(base if count == 0 else f'{base}-{count}')
    return found


def links(page: str) -> List[str]:
    return [m.group(1) for line in read_page(page)[0]
            for m in _LINK.finditer(_CODE_SPAN.sub('', line))]


def broken_links(page: str) -> List[str]:
    problems = []
    for target in links(page):
        if re.match(r'^[a-z][a-z0-9+.-]*:', target):   # http:, https:, mailto:
            continue
        path, _, anchor = target.partition('#')
        resolved = (osp.normpath(osp.join(osp.dirname(page), path)) if path
                    else page)
        if not osp.exists(osp.join(REPO, resolved)):
            problems.append(f'{page}: {target}: {resolved} does not exist')
            continue
        if anchor:
            if not resolved.endswith('.md'):
                problems.append(f'{page}: {target}: an anchor into a non-page')
            elif anchor not in anchors(resolved):
                problems.append(f'{page}: {target}: no heading #{anchor} in '
                                f'{resolved}')
    return problems


def command_paths(page: str) -> List[str]:
    """Repository paths named in the fenced code blocks of ``page``, and the
    scripts of the commands in its inline code spans."""
    prose, code = read_page(page)
    paths = [m.group(1).rstrip('.') for line in code for m in _PATH.finditer(line)]
    paths += [m.group(1) for line in prose for span in _CODE_SPAN.finditer(line)
              for m in [_SPAN_SCRIPT.match(span.group(2).strip())] if m]
    return [p for p in paths if p.split('/')[0] in REPO_DIRS]


def missing_command_paths(page: str) -> List[str]:
    """The paths of :func:`command_paths` that do not exist."""
    return [p for p in command_paths(page) if not osp.exists(osp.join(REPO, p))]


def test_pages_are_found():
    for page in ('README.md', 'docs/README.md', 'docs/troubleshooting.md',
                 'docs/changelog.md', 'docs/dev/README.md',
                 'configs/cenet/README.md', 'tools/README.md'):
        assert page in PAGES, page


@pytest.mark.parametrize('page', PAGES)
def test_links_and_anchors_resolve(page):
    assert not broken_links(page), '\n'.join(broken_links(page))


@pytest.mark.parametrize('page', PAGES)
def test_paths_in_commands_exist(page):
    missing = missing_command_paths(page)
    assert not missing, f'{page} names paths that do not exist: {missing}'


def test_the_checks_catch_a_broken_link(tmp_path, monkeypatch):
    """A missing file, a missing anchor and a missing command path are found
    (on a copy of the README with one link broken each way)."""
    with open(osp.join(REPO, 'README.md')) as f:
        text = f.read()
    assert '(docs/troubleshooting.md)' in text
    assert '(docs/ce_layer.md#frozen-ce-the-papers-two-detection-settings)' in text
    broken = (text.replace('(docs/troubleshooting.md)', '(docs/troubleshoot.md)')
              .replace('#frozen-ce-the-papers-two-detection-settings',
                       '#frozen-ce')
              .replace('bash tools/quick_start.sh', 'bash tools/quickstart.sh'))
    (tmp_path / 'docs').mkdir()
    (tmp_path / 'README.md').write_text(broken)
    for page in ('docs/ce_layer.md', 'docs/troubleshooting.md'):
        with open(osp.join(REPO, page)) as f:
            (tmp_path / page).write_text(f.read())
    monkeypatch.setattr(sys.modules[__name__], 'REPO', str(tmp_path))
    problems = broken_links('README.md')
    assert any('docs/troubleshoot.md does not exist' in p for p in problems)
    assert any('no heading #frozen-ce in docs/ce_layer.md' in p for p in problems)
    assert 'tools/quickstart.sh' in command_paths('README.md')


def test_the_command_check_catches_a_missing_script(tmp_path, monkeypatch):
    """A ``python tools/...py`` or ``bash tools/...sh`` in a fenced block, or
    an inline command, whose script does not exist fails the check; a path
    merely mentioned in prose (not a command) is not checked; with the
    scripts in place the same page passes."""
    page = ('# Tools\n\n```bash\n'
            'python tools/benchmarks/bench_gone.py --threads 2   # a comment\n'
            'OUT_DIR=x bash tools/gpu/gone_check.sh\n```\n\n'
            '- A question? `python tools/dev/gone.py save BEFORE.pt`\n'
            '- Moved away from `tools/old/place.py` (a mention, not a command).\n')
    (tmp_path / 'tools').mkdir()
    (tmp_path / 'tools' / 'README.md').write_text(page)
    monkeypatch.setattr(sys.modules[__name__], 'REPO', str(tmp_path))
    scripts = ['tools/benchmarks/bench_gone.py', 'tools/gpu/gone_check.sh',
               'tools/dev/gone.py']
    assert missing_command_paths('tools/README.md') == scripts
    for script in scripts:
        (tmp_path / script).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / script).write_text('')
    assert missing_command_paths('tools/README.md') == []


def test_tools_readme_names_every_script():
    """A newcomer finds every script of tools/ in tools/README.md (by its
    path under tools/, or its name in its folder's section)."""
    with open(osp.join(REPO, 'tools', 'README.md')) as f:
        text = f.read()
    scripts = [osp.relpath(p, osp.join(REPO, 'tools'))
               for ext in ('py', 'sh')
               for p in glob(osp.join(REPO, 'tools', '**', f'*.{ext}'), recursive=True)]
    assert len(scripts) > 20
    missing = [s for s in scripts if s not in text and osp.basename(s) not in text]
    assert not missing, f'tools/README.md does not name {missing}'


def test_slug_rules():
    assert slug("Frozen CE: the paper's two detection settings") == \
        'frozen-ce-the-papers-two-detection-settings'
    assert slug('`CEResNet` keys') == 'ceresnet-keys'
    assert slug('GN + CE against GN') == 'gn--ce-against-gn'
    assert slug('From an ImageNet classifier: `cls2backbone.py`') == \
        'from-an-imagenet-classifier-cls2backbonepy'
    assert slug('The honest floor (2026-12-02 03:55)') == \
        'the-honest-floor-2026-12-02-0355'


def test_readme_is_short_and_names_the_ci_commands():
    with open(osp.join(REPO, 'README.md')) as f:
        readme = f.read()
    assert len(readme.splitlines()) <= 200
    with open(osp.join(REPO, '.ci', 'run')) as f:
        ci = [line.strip() for line in f
              if line.strip().startswith('bash tools/')]
    assert ci == ['bash tools/setup_env.sh', 'bash tools/run_tests.sh'], ci
    _, code = split_page(readme)
    commands = [line.split('#')[0].strip() for line in code]
    assert all(c in commands for c in ci), commands


def test_output_folders_are_outputs():
    """The folders whose paths are not checked are what the commands write:
    git ignores them, and none of them is a repository folder."""
    with open(osp.join(REPO, '.gitignore')) as f:
        ignored = {line.strip().strip('/') for line in f}
    assert set(OUTPUT_DIRS) <= ignored
    assert not set(OUTPUT_DIRS) & set(REPO_DIRS)
