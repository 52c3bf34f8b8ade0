"""docs/troubleshooting.md covers every message that stops a user.

The messages are read from the code, so that the page cannot drift: a new
error message in ``cenet_mmdet/`` or ``tools/`` without an entry in the page
fails :func:`test_every_message_is_in_troubleshooting`.

What counts as a message (the ways this code tells a user that something is
wrong):

* Python (AST): the first argument of a call to an exception class (a name
  ending in ``Error``, ``Exception`` or ``Warning``, raised or returned by a
  helper), of ``parser.error``, ``warnings.warn``, ``report.problem``
  (``tools/gpu/check_env.py``), ``print_log`` at level WARNING or ERROR,
  ``print(..., file=sys.stderr)`` and ``sys.exit``; the message of an
  ``assert``. A message held in a variable is read from the variable's
  assignment in the same function; ``'; '.join(parts)`` from every
  ``parts.append(...)`` there.
* Shell (``tools/**/*.sh``, by line): ``echo "..." >&2``, ``refuse [N]
  "..."``, setup_env.sh's ``hint "..."`` (printed as "what to do" when the
  step fails), gpu_check.sh's ``fail_step NAME "..."``, run_offline_check.sh's
  ``phase NAME FAIL|REFUSED SECONDS "..."`` and ``say "WARNING: ..."``, and
  ``sys.exit('...')`` of Python embedded in a script.

A message is covered when its *key* appears in the page (whitespace
collapsed): the first literal piece of the message, between two formatted
values, that has at least ``MIN_KEY`` characters once stripped of spaces and
punctuation at its ends, cut at ``MAX_KEY`` characters.

Run this file as a script to print the messages the page does not cover:
``.venv/bin/python tests/test_docs/test_troubleshooting.py``.
"""
import ast
import os.path as osp
import re
import sys
from glob import glob
from typing import Dict, List, NamedTuple, Optional, Tuple

REPO = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
PAGE = osp.join(REPO, 'docs', 'troubleshooting.md')
MIN_KEY = 10
MAX_KEY = 60

# Not user-facing: test helpers (reference networks, process launchers).
SKIP_DIRS = ('cenet_mmdet/testing/',)

# Messages that a user cannot cause, with why (internal consistency checks of
# the code or of a benchmark's own construction). Keyed by (file, key).
INTERNAL = {
    # ops.GradientLink is used by CE's own forward only
    ('cenet_mmdet/ops/autograd.py', 'GradientLink joins two different inputs'),
    # the lower bounds (floors.py, bench_backbones): checks of their own
    # model surgery
    ('tools/benchmarks/floors.py', 'floor: CE layers not replaced'),
    ('tools/benchmarks/bench_backbones.py', 'floor: replaced'),
    # bench_backbones reads /proc/self/status (Linux only, always there)
    ('tools/benchmarks/bench_backbones.py', 'in /proc/self/status'),
    # bench_backbones --compile: a recompilation inside the timed calls
    ('tools/benchmarks/bench_backbones.py', 'the timed calls compiled'),
    # ImageClassifier.forward's mode is chosen by MMEngine, never by a user
    ('cenet_mmdet/classification/model.py', 'invalid mode'),
}

# Messages with no literal piece of MIN_KEY characters, whose text is
# assembled elsewhere: (file, source of the message expression), each with a
# comment saying where the parts come from. The parts are checked instead
# (HELPERS below) or are messages of their own elsewhere.
OPAQUE = {
    # the analysis tools' path check joins _path_problem's messages (HELPERS)
    ('cenet_mmdet/analysis.py', "'; '.join(problems)"),
    # ... one of which has no long literal piece: "checkpoint of 'CE' not
    # found: PATH" is in the page with an example
    ('cenet_mmdet/analysis.py', "f'{kind} of {label!r} not found: {path}'"),
    # the tools print an exception raised (and checked) elsewhere
    ('cenet_mmdet/analysis.py', "f'error: {err}'"),
    ('cenet_mmdet/classification/checkpoints.py', "f'{prog}: error: {error}'"),
    ('cenet_mmdet/classification/checkpoints.py',
     "f'{prog}: warning: {warning.message}'"),
    # channel_ablation re-raises engine.evaluation_check's message
    ('tools/analysis_tools/channel_ablation.py', 'str(error)'),
    # the located error of CEResNet wraps a layer's own ValueError
    ('cenet_mmdet/models/backbones/ce_resnet.py', "f'CEResNet: {err}'"),
    # a failed subprocess's output, and cuda_peak.py passing on an exit code
    ('tools/experiments/imagenet_learning_check.py',
     '(proc.stdout + proc.stderr)[-4000:]'),
    ('tools/gpu/cuda_peak.py', 'exc.code'),
    # the shell helpers that print a message given by their caller, and
    # setup_env.sh's blank line before "FAILED during"
    ('tools/gpu/gpu_check.sh', '[gpu_check] $1'),
    ('tools/gpu/run_offline_check.sh', '[offline_check] $2'),
    ('tools/setup_env.sh', ''),
    # kit_manifest.py lists what pip's resolution dropped (information)
    ('tools/gpu/kit_manifest.py', "f'dropped {name}: {reason}'"),
}

# Functions whose returned strings are messages (parts of an OPAQUE one).
HELPERS = {('cenet_mmdet/analysis.py', '_path_problem')}

_CALLS = {'error', 'warn', 'problem', 'exit'}


class Message(NamedTuple):
    path: str
    line: int
    key: Optional[str]   # None: no literal piece long enough
    source: str          # the message expression (Python) or line (shell)


def key_of(pieces: List[Optional[str]]) -> Optional[str]:
    """The first literal piece with >= MIN_KEY characters (stripped), cut at
    MAX_KEY; ``pieces`` holds literal strings and None for formatted values."""
    for piece in pieces:
        if piece is None:
            continue
        piece = ' '.join(piece.split())
        piece = piece.strip(' :;,.()[]\'"-=\\')
        if len(piece) >= MIN_KEY:
            return piece[:MAX_KEY].rstrip()
    return None


# --------------------------------------------------------------------- Python
def _pieces(node: ast.AST, scope: Optional[ast.AST]) -> Optional[List[Optional[str]]]:
    """Literal pieces of a string expression, or None if it is not one."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return [node.value]
    if isinstance(node, ast.JoinedStr):
        out: List[Optional[str]] = []
        for value in node.values:
            if isinstance(value, ast.Constant):
                out.append(value.value)
            else:
                out.append(None)
        return out
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
        left, right = _pieces(node.left, scope), _pieces(node.right, scope)
        return (left or [None]) + (right or [None])
    if isinstance(node, ast.Name) and scope is not None:
        for sub in ast.walk(scope):
            if (isinstance(sub, ast.Assign) and len(sub.targets) == 1
                    and isinstance(sub.targets[0], ast.Name)
                    and sub.targets[0].id == node.id):
                found = _pieces(sub.value, None)
                if found is not None:
                    return found
    return None


def _appended(name: str, scope: ast.AST) -> List[ast.AST]:
    """Arguments of every ``name.append(...)`` in ``scope``."""
    return [sub.args[0] for sub in ast.walk(scope)
            if isinstance(sub, ast.Call) and isinstance(sub.func, ast.Attribute)
            and sub.func.attr == 'append' and isinstance(sub.func.value, ast.Name)
            and sub.func.value.id == name and sub.args]


def _call_name(func: ast.AST) -> str:
    if isinstance(func, ast.Name):
        return func.id
    if isinstance(func, ast.Attribute):
        return func.attr
    return ''


def _message_args(node: ast.AST) -> List[ast.AST]:
    """The message expressions of a node (empty if it reports nothing)."""
    if isinstance(node, ast.Assert) and node.msg is not None:
        return [node.msg]
    if not isinstance(node, ast.Call):
        return []
    name = _call_name(node.func)
    keywords = {k.arg: k.value for k in node.keywords}
    if name.endswith(('Error', 'Exception', 'Warning')) or name in _CALLS:
        if name == 'exit' and not (node.args and _pieces(node.args[0], None)):
            return []   # sys.exit(status)
        if name == 'SystemExit':
            return []
        return node.args[:1]
    if name == 'print_log':
        level = keywords.get('level')
        if ((isinstance(level, ast.Attribute)
             and level.attr in ('WARNING', 'ERROR', 'CRITICAL'))
                or (isinstance(level, ast.Constant) and level.value >= 30)):
            return node.args[:1]
        return []
    if name == 'print':
        where = keywords.get('file')
        if isinstance(where, ast.Attribute) and where.attr == 'stderr':
            return node.args[:1]
    return []


def _scopes(tree: ast.AST) -> Dict[ast.AST, ast.AST]:
    """node -> the innermost function (or module) that holds it."""
    owner: Dict[ast.AST, ast.AST] = {}

    def visit(node: ast.AST, scope: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            owner[child] = scope
            visit(child, child if isinstance(
                child, (ast.FunctionDef, ast.AsyncFunctionDef)) else scope)

    visit(tree, tree)
    return owner


def python_messages(path: str) -> List[Message]:
    rel = osp.relpath(path, REPO)
    with open(path) as f:
        text = f.read()
    tree = ast.parse(text)
    owner = _scopes(tree)
    found: List[Message] = []

    def add(expr: ast.AST, scope: ast.AST) -> None:
        source = ast.get_source_segment(text, expr) or ''
        # '; '.join(parts): every appended part is a message
        if (isinstance(expr, ast.Call) and isinstance(expr.func, ast.Attribute)
                and expr.func.attr == 'join' and expr.args
                and isinstance(expr.args[0], ast.Name)):
            parts = _appended(expr.args[0].id, scope)
            if parts:
                for part in parts:
                    add(part, scope)
                return
        pieces = _pieces(expr, scope)
        key = key_of(pieces) if pieces else None
        found.append(Message(rel, expr.lineno, key, ' '.join(source.split())))

    for node in ast.walk(tree):
        for expr in _message_args(node):
            add(expr, owner.get(node, tree))
        if (isinstance(node, ast.FunctionDef)
                and (rel, node.name) in HELPERS):
            for sub in ast.walk(node):
                if isinstance(sub, ast.Return) and sub.value is not None \
                        and _pieces(sub.value, None):
                    add(sub.value, node)
    return found


# ---------------------------------------------------------------------- shell
_SHELL_PATTERNS = (
    re.compile(r'echo "(?P<msg>[^"]*)"[^#]*>&2'),
    re.compile(r'\brefuse (?:\d+ )?"(?P<msg>[^"]*)"'),
    re.compile(r'^\s*hint "(?P<msg>[^"]*)"'),
    re.compile(r'\bfail_step \S+ "(?P<msg>[^"]*)"'),
    re.compile(r'\bphase \w+ (?:FAIL|REFUSED) .*?"(?P<msg>[^"]*)"\s*(?:;|$)'),
    re.compile(r'\bsay "(?P<msg>WARNING: [^"]*)"'),
    # Python embedded in a script (a heredoc)
    re.compile(r"\bsys\.exit\(f?'(?P<msg>[^']*)'"),
)
_SHELL_TAG = re.compile(r'^\[\w+\] ')   # "[setup] ", "[kit] "
# $VAR, ${...}, $((...)), $(...); {...} of an embedded f-string
_SHELL_VAR = re.compile(r'\$(?:\{[^}]*\}|\(\([^)]*\)\)|\([^)]*\)|\w+|\$)|\{[^}]*\}')


def shell_messages(path: str) -> List[Message]:
    rel = osp.relpath(path, REPO)
    found = []
    with open(path) as f:
        for number, line in enumerate(f, 1):
            if line.lstrip().startswith('#'):
                continue
            for pattern in _SHELL_PATTERNS:
                for match in pattern.finditer(line):
                    pieces: List[Optional[str]] = []
                    text = _SHELL_TAG.sub('', match['msg'])
                    for literal in _SHELL_VAR.split(text):
                        pieces += [literal, None]
                    found.append(Message(rel, number, key_of(pieces),
                                         match['msg']))
    return found


# ----------------------------------------------------------------- collection
def all_messages() -> List[Message]:
    messages: List[Message] = []
    for path in sorted(glob(osp.join(REPO, 'cenet_mmdet', '**', '*.py'),
                            recursive=True)
                       + glob(osp.join(REPO, 'tools', '**', '*.py'),
                              recursive=True)):
        if osp.relpath(path, REPO).startswith(SKIP_DIRS):
            continue
        messages += python_messages(path)
    for path in sorted(glob(osp.join(REPO, 'tools', '**', '*.sh'),
                            recursive=True)):
        messages += shell_messages(path)
    return messages


def page_text() -> str:
    with open(PAGE) as f:
        text = f.read()
    return ' '.join(text.replace('\\|', '|').split())


def uncovered(messages: List[Message], page: str) -> Tuple[List[Message], List[Message]]:
    """(messages whose key is not in the page, unreadable messages)."""
    missing, opaque = [], []
    for message in messages:
        if message.key is None:
            if (message.path, message.source) not in OPAQUE:
                opaque.append(message)
        elif (message.path, message.key) not in INTERNAL and message.key not in page:
            missing.append(message)
    return missing, opaque


# ---------------------------------------------------------------------- tests
def test_every_message_is_in_troubleshooting():
    messages = all_messages()
    assert len(messages) > 150, len(messages)   # the walk finds the code's messages
    missing, opaque = uncovered(messages, page_text())
    assert not opaque, (
        'messages with no literal text of >= %d characters: give them one, or '
        'add them to OPAQUE with where their text comes from:\n%s' % (
            MIN_KEY, '\n'.join(f'{m.path}:{m.line}: {m.source}' for m in opaque)))
    assert not missing, (
        'docs/troubleshooting.md lacks these messages (cause and fix for '
        'each):\n' + '\n'.join(f'{m.path}:{m.line}: {m.key!r}' for m in missing))


def test_allow_lists_are_current():
    """Every INTERNAL, OPAQUE and HELPERS entry still names code (OPAQUE:
    a message that has no key)."""
    messages = all_messages()
    keys = {(m.path, m.key) for m in messages}
    sources = {(m.path, m.source) for m in messages if m.key is None}
    assert INTERNAL <= keys, INTERNAL - keys
    assert set(OPAQUE) <= sources, set(OPAQUE) - sources
    for path, name in HELPERS:
        with open(osp.join(REPO, path)) as f:
            assert f'def {name}(' in f.read(), (path, name)


def test_a_new_message_is_caught(tmp_path):
    """The walk sees a message added to code, and the check reports it."""
    source = tmp_path / 'new.py'
    source.write_text(
        'def f(parser, x):\n'
        '    if x:\n'
        "        raise ValueError(f'{x}: a brand-new failure that no page names')\n"
        "    message = 'another one, kept in a variable first'\n"
        '    parts = []\n'
        "    parts.append(f'first part of a joined message, {x}')\n"
        "    parser.error('; '.join(parts))\n"
        '    raise RuntimeError(message)\n')
    script = tmp_path / 'new.sh'
    script.write_text('echo "[new] a shell failure nobody documented: $X" >&2\n'
                      'refuse 2 "a refusal nobody documented"\n')
    found = python_messages(str(source)) + shell_messages(str(script))
    keys = sorted(m.key for m in found)
    assert keys == sorted([
        'a brand-new failure that no page names',
        'another one, kept in a variable first',
        'first part of a joined message',
        'a shell failure nobody documented',
        'a refusal nobody documented']), keys
    missing, opaque = uncovered(found, page_text())
    assert len(missing) == 5 and not opaque


if __name__ == '__main__':
    missing, opaque = uncovered(all_messages(), page_text())
    for m in opaque:
        print(f'OPAQUE  {m.path}:{m.line}: {m.source}')
    for m in missing:
        print(f'MISSING {m.path}:{m.line}: {m.key}')
    sys.exit(1 if missing or opaque else 0)
