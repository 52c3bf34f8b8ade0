"""Session fixtures of tests/test_tools: one SyncCE smoke run (2 gloo
processes) shared by test_e2e_cpu.py and test_exact_resume.py, in steps that
run once per session and only when a test needs them (see ``e2e_run.py``):

* ``syncce_workspace``: synthetic data and the smoke config with test hooks;
* ``syncce_reference``: 8 iterations uninterrupted, AP at the end;
* ``syncce_killed``: a run of 6 iterations with rank 1 SIGKILLed after 5;
* ``syncce_resumed``: that run resumed to 8 iterations.

The tests only read what these runs wrote; each writes its own outputs in
its own directory.
"""
import pytest

import e2e_run


@pytest.fixture(scope='session')
def syncce_workspace(tmp_path_factory):
    return e2e_run.make_workspace(str(tmp_path_factory.mktemp('syncce_e2e')))


@pytest.fixture(scope='session')
def syncce_reference(syncce_workspace):
    return e2e_run.reference_run(syncce_workspace)


@pytest.fixture(scope='session')
def syncce_killed(syncce_workspace):
    return e2e_run.killed_run(syncce_workspace)


@pytest.fixture(scope='session')
def syncce_resumed(syncce_workspace, syncce_killed):
    return e2e_run.resumed_run(syncce_workspace, syncce_killed)
