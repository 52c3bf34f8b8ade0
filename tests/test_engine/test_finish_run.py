"""``finish_distributed_run``: a finished multi-process run exits 0 with its
output flushed, and a single-process call changes nothing."""
import os
import subprocess
import sys
import textwrap

import torch.distributed as dist

from cenet_mmdet.engine import finish_distributed_run

WORKER = textwrap.dedent('''
    import logging, os, sys
    import torch, torch.distributed as dist
    from cenet_mmdet.engine import finish_distributed_run
    rank, init_file = int(sys.argv[1]), sys.argv[2]
    os.environ.update(RANK=str(rank), WORLD_SIZE='2')
    dist.init_process_group('gloo', init_method='file://' + init_file,
                            rank=rank, world_size=2)
    total = torch.ones(1) * (rank + 1)
    dist.all_reduce(total)
    logging.basicConfig(stream=open(sys.argv[3], 'w'), level=logging.INFO)
    logging.info('logged %d', int(total))
    sys.stdout.write(f'rank {rank} total {int(total)}')  # no newline: buffered
    finish_distributed_run()
    sys.stdout.write('not reached')
''')


def test_two_processes_exit_zero_with_flushed_output(tmp_path):
    script = tmp_path / 'worker.py'
    script.write_text(WORKER)
    init_file = str(tmp_path / 'init')
    procs = [
        subprocess.Popen([sys.executable, str(script), str(rank), init_file,
                          str(tmp_path / f'log{rank}.txt')],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env=dict(os.environ, CUDA_VISIBLE_DEVICES=''))
        for rank in range(2)
    ]
    for rank, proc in enumerate(procs):
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err[-2000:]
        assert out == f'rank {rank} total 3'  # flushed, and nothing after
        assert (tmp_path / f'log{rank}.txt').read_text().strip().endswith('logged 3')


def test_single_process_call_is_a_no_op():
    assert not dist.is_initialized()
    finish_distributed_run()  # returns (no exit, nothing to destroy)
