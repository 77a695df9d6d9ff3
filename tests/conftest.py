import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest


@pytest.fixture(scope="session")
def tiny_model_path():
    """The embedded default model, built once per machine (a few seconds) and cached."""
    from rlpipe.tiny import default_model_path

    return str(default_model_path())
