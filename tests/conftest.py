"""Test-session settings: the tests use tiny tensors, for which one intra-op
thread is faster than several (and CI machines have 2 cores)."""
import torch

torch.set_num_threads(1)
