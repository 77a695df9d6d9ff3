"""Who a message belongs to: the run (run_dir/run.json) and the learner's incarnation.

A run id is made once, when a run directory is first used, and read by every role started
on it afterwards (by `rlpipe run`, by hand, or by a supervisor after a crash). The learner
counts its own starts in run_dir/learner/incarnation: each start takes the next number, so
an explorer or the buffer can tell a restarted learner's weights and requests from the dead
one's, whatever their version numbers.
"""

from __future__ import annotations

import json
import os
import re
import uuid
from pathlib import Path

from rlpipe.training.checkpoint import write_json_atomic

RUN_FILE = "run.json"
INCARNATION_FILE = "incarnation"


def _create_run_file(run_dir: str | os.PathLike, run_id: str) -> bool:
    """Create run_dir/run.json holding run_id, exclusively and durably; False if it exists
    already (made by another role, maybe at this very moment: read it with read_run_id)."""
    path = Path(run_dir) / RUN_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as f:
        f.write(json.dumps({"run_id": run_id}))
        f.flush()
        os.fsync(f.fileno())
    return True


def run_id(run_dir: str | os.PathLike) -> str:
    """The run's id, made on first use. Safe when roles start at the same moment: the file
    is created exclusively, and a role that loses the race reads the winner's id."""
    _create_run_file(run_dir, uuid.uuid4().hex[:12])
    return read_run_id(run_dir)


def adopt_run_id(run_dir: str | os.PathLike, run_id: str) -> None:
    """--run-id: run_dir/run.json holds run_id, so that roles on several hosts (each with its
    own run_dir) take each other's messages for the same run. Made if missing; a ValueError
    for a malformed id or a run_dir that already holds another run."""
    if not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", run_id):
        raise ValueError(f"--run-id {run_id!r}: use 1-64 letters, digits, '_', '.' or '-'")
    if not _create_run_file(run_dir, run_id) and (held := read_run_id(run_dir)) != run_id:
        raise ValueError(f"{Path(run_dir) / RUN_FILE} holds run {held!r}, not --run-id {run_id!r}: an earlier run "
                         f"used {run_dir}; choose another name or runs_dir, or remove it")


def read_run_id(run_dir: str | os.PathLike, attempts: int = 50) -> str:
    """The id in run.json; waits briefly for a role that is still writing it."""
    import time

    path = Path(run_dir) / RUN_FILE
    for _ in range(attempts):
        try:
            return json.loads(path.read_text())["run_id"]
        except (json.JSONDecodeError, KeyError):
            time.sleep(0.01)  # created but not yet written by the role that made it
    raise ValueError(f"{path} does not hold a run id (delete the file to start a new run there)")


def next_incarnation(learner_dir: str | os.PathLike) -> int:
    """Count one more learner start and return its number (1 for the first)."""
    path = Path(learner_dir) / INCARNATION_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    n = current_incarnation(learner_dir) + 1
    write_json_atomic(path, n)  # the number alone, as JSON writes it
    return n


def current_incarnation(learner_dir: str | os.PathLike) -> int:
    """The number of learner starts so far (0 before the first)."""
    path = Path(learner_dir) / INCARNATION_FILE
    return int(path.read_text()) if path.exists() else 0
