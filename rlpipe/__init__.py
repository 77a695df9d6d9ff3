"""rlpipe: asynchronous off-policy RL post-training for language models, in Tinker's vocabulary."""

from __future__ import annotations

from typing import TYPE_CHECKING

from rlpipe import types

if TYPE_CHECKING:
    from rlpipe.pipeline.config import RunConfig

__all__ = ["ServiceClient", "TrainingClient", "run", "types"]
__version__ = "0.1.0"


def run(config: RunConfig, *, replace: bool = False, resume: bool = False, quiet: bool = False) -> list[dict]:
    """Run the pipeline as `rlpipe run` does, from Python, and return the learner's metric
    records (one dict per step, as in run_dir/metrics.jsonl).

    config: a rlpipe.pipeline.config.RunConfig, built in Python or read from TOML with
    rlpipe.pipeline.config.load("myenv.toml"). It is written to runs_dir/name/run_config.json
    (not config.json, which the launcher rewrites with any API key hidden), checked, and the
    roles are started from it as processes in the current directory: the dataset factory must
    be importable there (a module in this directory, on PYTHONPATH, or installed), never a class
    of the script running as __main__. Call it under `if __name__ == "__main__":`.
    replace: remove an earlier run in the same directory first (otherwise it is refused);
    resume: continue it from its checkpoints instead (as `rlpipe run --resume`).
    quiet: no progress display on the console.
    Raises SystemExit when a role fails for good or the run directory already holds a run."""
    from rlpipe.pipeline.config import RunConfig
    from rlpipe.pipeline.launch import run_to_end

    if not isinstance(config, RunConfig):
        raise TypeError(f"rlpipe.run takes a RunConfig, got {type(config).__name__}; "
                        "for a TOML file: rlpipe.run(rlpipe.pipeline.config.load(path))")
    return run_to_end(config, "run_config.json", replace=replace, quiet=quiet, resume=resume)


def __getattr__(name: str):
    # Lazy: the buffer and explorer roles import rlpipe without paying for torch + transformers.
    if name == "ServiceClient":
        from rlpipe.training.service import ServiceClient

        return ServiceClient
    if name == "TrainingClient":
        from rlpipe.training.client import TrainingClient

        return TrainingClient
    raise AttributeError(f"module 'rlpipe' has no attribute {name!r}")
