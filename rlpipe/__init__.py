"""rlpipe: asynchronous off-policy RL post-training for language models, in Tinker's vocabulary."""

from rlpipe import types

__all__ = ["ServiceClient", "TrainingClient", "types"]
__version__ = "0.1.0"


def __getattr__(name: str):
    # Lazy: the buffer and explorer roles import rlpipe without paying for torch + transformers.
    if name == "ServiceClient":
        from rlpipe.service import ServiceClient

        return ServiceClient
    if name == "TrainingClient":
        from rlpipe.training import TrainingClient

        return TrainingClient
    raise AttributeError(f"module 'rlpipe' has no attribute {name!r}")
