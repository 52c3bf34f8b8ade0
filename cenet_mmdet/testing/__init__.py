"""Independent references used by the tests and the benchmarks."""
from .released_ce import (ReleasedBNCE, ReleasedCE, ReleasedNormCE,
                          reference_norm, released_to_plugin_keys)
from .released_resnet import ReleasedCEResNet  # noqa: F401

__all__ = ['ReleasedBNCE', 'ReleasedCE', 'ReleasedNormCE', 'reference_norm',
           'released_to_plugin_keys']
