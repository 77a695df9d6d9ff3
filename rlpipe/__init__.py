"""rlpipe: asynchronous off-policy RL post-training for language models, in Tinker's vocabulary."""

from rlpipe import types
from rlpipe.service import ServiceClient
from rlpipe.training import TrainingClient

__all__ = ["ServiceClient", "TrainingClient", "types"]
__version__ = "0.1.0"
