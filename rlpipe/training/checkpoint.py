"""On-disk layout of training state and sampler weights.

A state directory (save_state) holds everything a resume needs:
    adapter/                 the PEFT adapter (also loadable by peft and vLLM as is)
    optimizer.pt             torch optimizer state_dict
    rng.pt                   torch / numpy / python RNG states
    rlpipe_state.json        base model, LoRA config, step
A sampler-weights directory (save_weights_for_sampler) is a plain PEFT adapter directory.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import msgspec
import numpy as np
import torch

from rlpipe.types import LoraConfig

STATE_FILE = "rlpipe_state.json"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


class StateMeta(msgspec.Struct):
    base_model: str
    lora: LoraConfig
    step: int
    format: int = 1


def write_meta(path: Path, meta: StateMeta) -> None:
    (path / STATE_FILE).write_bytes(msgspec.json.format(msgspec.json.encode(meta)))


def read_meta(path: str | Path) -> StateMeta:
    path = Path(path)
    meta_file = path / STATE_FILE
    if not path.is_dir():
        raise FileNotFoundError(f"{path} is not a directory, so not an rlpipe checkpoint")
    if not meta_file.exists():
        raise ValueError(
            f"{path} is not an rlpipe state checkpoint: {STATE_FILE} is missing "
            "(save_state writes one; save_weights_for_sampler output holds weights only)"
        )
    missing = [p for p in ("adapter/adapter_config.json", "optimizer.pt") if not (path / p).exists()]
    if missing:
        raise ValueError(f"checkpoint {path} is incomplete: missing {', '.join(missing)}")
    try:
        return msgspec.json.decode(meta_file.read_bytes(), type=StateMeta)
    except msgspec.DecodeError as err:
        raise ValueError(f"checkpoint {path}: {STATE_FILE} is malformed: {err}") from None


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def check_name(name: str) -> str:
    """Checkpoint names become directory names; refuse anything that escapes the run dir."""
    if not name or "/" in name or "\\" in name or name in (".", ".."):
        raise ValueError(f"checkpoint name {name!r} must be a plain, non-empty directory name")
    return name


def adapter_rank(adapter_dir: Path) -> int:
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    return int(config["r"])


def write_adapter(path: Path, files: dict[str, bytes]) -> None:
    """Write a PEFT adapter directory from {file name: bytes} (TrainingClient._adapter_files)."""
    path.mkdir(parents=True, exist_ok=True)
    for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
        (path / name).write_bytes(files[name])


def fsync_tree(path: str | Path) -> None:
    """Make a checkpoint durable: fsync every file and directory under path, and path's own
    entry in its parent. Before this, a power cut could leave the files empty."""
    path = Path(path)
    for item in [*path.rglob("*"), path, path.parent]:
        fd = os.open(item, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
