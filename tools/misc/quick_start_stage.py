#!/usr/bin/env python
"""Run one stage of ``tools/quick_start.sh`` quietly: the full output to a log,
one progress line to the terminal.

    python tools/misc/quick_start_stage.py --log LOG --label "2/3 train" \
        --kind train -- python tools/train.py CONFIG ...

The command's stdout and stderr go, line by line, to ``LOG``. The terminal
gets one line: ``--kind train`` counts MMEngine's ``Iter(train) [ i/N]`` log
lines (with the loss and the ETA), ``--kind test`` its ``Iter(test) [ i/N]``
(or ``Epoch(test)``) lines, ``--kind data`` reads the summary of
``make_synthetic_coco.py``. On a terminal the line is redrawn in place;
otherwise (a pipe, a file) it is printed at a quarter, a half and three
quarters of the run, and at the end.

If the command fails, the last ``--tail`` lines of the log and its path go to
stderr, and this exits with the command's exit status. Standard library only.
"""
import argparse
import os
import re
import shutil
import subprocess
import sys
import time
from collections import deque

PREFIX = '[quick_start]     '
_ANSI = re.compile(r'\x1b\[[0-9;]*[A-Za-z]')
_TRAIN = re.compile(r'Iter\(train\)\s*\[\s*(\d+)/(\d+)\]')
_TEST = re.compile(r'(?:Epoch|Iter)\(test\)\s*\[\s*(\d+)/(\d+)\]')
_LOSS = re.compile(r'\bloss: (\S+)')
_ETA = re.compile(r'\beta: (\d+:\d\d:\d\d)')
_SPLIT = re.compile(r'^(\w+): (\d+) images, (\d+) instances')


class Progress:
    """The stage's one terminal line."""

    def __init__(self, kind: str, tty: bool):
        self.kind, self.tty = kind, tty
        self.done = self.total = 0
        self.loss = self.eta = None
        self.splits = []
        self.quarter = 0   # the last quarter printed (not on a terminal)
        self.start = time.time()

    def feed(self, line: str) -> None:
        if self.kind == 'data':
            match = _SPLIT.match(line)
            if match:
                self.splits.append((match[1], int(match[2]), int(match[3])))
            return
        match = (_TRAIN if self.kind == 'train' else _TEST).search(line)
        if not match:
            return
        self.done, self.total = int(match[1]), int(match[2])
        loss, eta = _LOSS.search(line), _ETA.search(line)
        self.loss = loss[1] if loss else self.loss
        self.eta = eta[1] if eta else self.eta
        if self.tty:
            self.draw()
        elif self.total and 4 * self.done // self.total > self.quarter:
            self.quarter = 4 * self.done // self.total
            if self.done < self.total:   # the end has its own line
                print(PREFIX + self.text(), flush=True)

    def text(self, end: bool = False) -> str:
        if self.kind == 'data':
            if not self.splits:
                return 'generating' if not end else 'no images yet'
            images = ' + '.join(f'{split} {n}' for split, n, _ in self.splits)
            shapes = sum(count for _, _, count in self.splits)
            return f'{images} images, {shapes} shapes'
        unit = 'iter' if self.kind == 'train' else 'image'
        if not self.total:   # before MMEngine's first log line
            return 'no log line yet' if end else 'starting'
        width = 20
        full = width * self.done // self.total
        parts = [f'[{"#" * full}{"-" * (width - full)}]',
                 f'{unit} {self.done}/{self.total}']
        if self.loss is not None:
            parts.append(f'loss {self.loss}')
        if self.eta is not None and not end:
            parts.append(f'eta {self.eta}')
        return '  '.join(parts)

    def draw(self) -> None:
        columns = shutil.get_terminal_size((80, 24)).columns
        sys.stdout.write('\r\x1b[K' + (PREFIX + self.text())[:columns - 1])
        sys.stdout.flush()

    def finish(self, ok: bool) -> None:
        seconds = time.time() - self.start
        status = f'done in {seconds:.0f} s' if ok else f'FAILED after {seconds:.0f} s'
        line = f'{PREFIX}{self.text(end=True)}  {status}'
        if self.tty:   # whole, even if it wraps: nothing redraws it
            sys.stdout.write('\r\x1b[K' + line + '\n')
            sys.stdout.flush()
        else:
            print(line, flush=True)


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--log', required=True, help='the log file to write')
    parser.add_argument('--label', required=True, help='the stage, e.g. "2/3 train"')
    parser.add_argument('--kind', choices=('data', 'train', 'test'), required=True)
    parser.add_argument('--tail', type=int, default=20,
                        help='log lines shown on failure')
    parser.add_argument('command', nargs='+',
                        help='the command and its arguments, after --')
    return parser.parse_args()


def run(command, log, progress: Progress, tail: deque) -> int:
    """Run ``command``, its output to ``log``, ``progress`` and ``tail``;
    return its exit status as the shell gives it."""
    env = dict(os.environ, PYTHONUNBUFFERED='1')   # lines as they come
    try:
        child = subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, env=env, text=True, errors='replace')
    except OSError as err:   # no such program: 127, as the shell
        log.write(f'{err}\n')
        tail.append(str(err))
        return 127
    try:
        for line in child.stdout:
            log.write(line)
            log.flush()
            line = _ANSI.sub('', line.rstrip('\n'))
            tail.append(line)
            progress.feed(line)
        code = child.wait()
    except KeyboardInterrupt:   # Ctrl-C reached the child too
        code = child.wait() or 130
    return 128 - code if code < 0 else code   # killed by signal -code


def main() -> int:
    args = parse_args()
    tty = sys.stdout.isatty() and os.environ.get('TERM') != 'dumb'
    progress = Progress(args.kind, tty)
    tail = deque(maxlen=args.tail)
    os.makedirs(os.path.dirname(os.path.abspath(args.log)), exist_ok=True)
    if tty:
        progress.draw()
    with open(args.log, 'w') as log:
        code = run(args.command, log, progress, tail)
    progress.finish(code == 0)
    if code != 0:
        print(f'[quick_start] stage failed: {args.label} exited with status '
              f'{code}; the last lines of its log, {args.log}:', file=sys.stderr)
        sys.stderr.write(''.join(f'    {line}\n' for line in tail))
        print(f'[quick_start] stage failed: {args.label}; full log: {args.log}',
              file=sys.stderr)
    return code


if __name__ == '__main__':
    sys.exit(main())
