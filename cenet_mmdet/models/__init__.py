from .backbones import *  # noqa: F401,F403  (registers CEResNet)
from .layers import *  # noqa: F401,F403  (registers CE, SyncCE)
