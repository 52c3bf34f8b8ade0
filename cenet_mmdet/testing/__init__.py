"""Independent references used by the tests and the benchmarks."""
from .released_ce import ReleasedBNCE, ReleasedCE, released_to_plugin_keys
from .released_resnet import ReleasedCEResNet  # noqa: F401

__all__ = ['ReleasedBNCE', 'ReleasedCE', 'released_to_plugin_keys']
