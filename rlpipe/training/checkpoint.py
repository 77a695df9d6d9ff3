"""On-disk layout of training state and sampler weights.

A state directory (save_state) holds everything a resume needs:
    adapter/                 the PEFT adapter (also loadable by peft and vLLM as is)
    optimizer.pt             torch optimizer state_dict
    rng.pt                   torch / numpy / python RNG states
    rlpipe_state.json        base model, LoRA config, step
A sampler-weights directory (save_weights_for_sampler) is a plain PEFT adapter directory.

Also the two rules every role's files follow: JSON written atomically and durably
(write_json_atomic), and which of a series of checkpoints to delete (pruned).
torch and numpy are imported where used: the buffer and the launcher write their JSON
through this module without paying for them.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import threading
from pathlib import Path

import msgspec

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
    import numpy as np
    import torch

    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    import numpy as np
    import torch

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
        _fsync(item)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json_atomic(path: str | Path, obj, *, indent: int | None = None) -> None:
    """Write obj as JSON to path so that a reader sees the old file or the new one, never a
    part of one, and a crash or a power cut leaves one of them: a temporary file beside path
    (named for this process and thread, so two writers never share one), fsynced, renamed
    over path, and the rename fsynced in the directory."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=indent)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)  # only left when the write failed
    _fsync(path.parent)


def pruned(names: list[str], keep_newest: int, keep: str) -> list[str]:
    """Which of names (oldest first) to delete so that the newest keep_newest stay; `keep`
    (the one just written) always stays, and keep_newest <= 0 keeps them all. One rule for
    checkpoints and sampler weights, on disk (prune_dirs) or on a Tinker endpoint."""
    if keep_newest <= 0:
        return []
    return [n for n in names[:-keep_newest] if n != keep]


def prune_dirs(folder: Path, prefix: str, keep_newest: int, keep: str) -> list[str]:
    """Delete the directories prefix* in folder that pruned() names (names sort by step);
    returns the names deleted."""
    names = sorted(p.name for p in Path(folder).iterdir() if p.is_dir() and p.name.startswith(prefix))
    doomed = pruned(names, keep_newest, keep)
    for name in doomed:
        shutil.rmtree(Path(folder) / name, ignore_errors=True)
    return doomed
