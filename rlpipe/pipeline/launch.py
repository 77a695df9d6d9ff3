"""`rlpipe run`: the three roles as processes on one machine, watched until done.

Each role runs in its own session (process group), so stopping it also stops what it
started (the vLLM engine core). Any role failing, or Ctrl-C, stops all of them: SIGTERM,
then SIGKILL after a grace period. No orphans are left behind.

A role that fails records its error (record_failure, written by the `rlpipe <role>` command)
before it exits; the launcher notices the exit within POLL_S and prints the role and that
error line on the console, then the end of the role's log.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from rlpipe.pipeline.config import RunConfig, dump, load
from rlpipe.metrics import read_metrics

ROLES = ("buffer", "learner", "explorer")
GRACE_S = 15.0
POLL_S = 0.5


def failure_file(run_dir: Path, role: str) -> Path:
    return Path(run_dir) / "logs" / f"{role}.failed"


def record_failure(run_dir: Path, role: str, error: BaseException) -> None:
    """What a failing role leaves for the launcher to print: its exception line."""
    path = failure_file(run_dir, role)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"{type(error).__name__}: {error}\n")


def role_command(role: str, config_path: str, sets: list[str], resume: bool) -> list[str]:
    cmd = [sys.executable, "-m", "rlpipe.cli", role, config_path]
    for item in sets:
        cmd += ["--set", item]
    if resume and role == "learner":
        cmd.append("--resume")
    return cmd


def stop_all(procs: dict[str, subprocess.Popen], grace_s: float = GRACE_S) -> None:
    # SIGTERM to each role alone: it shuts down what it started (the vLLM engine core and
    # its shared memory); a group-wide SIGTERM would kill those first and leak /dev/shm.
    for proc in procs.values():
        if proc.poll() is None:
            proc.terminate()
    _wait_all(procs, grace_s)
    for proc in procs.values():
        _signal_group(proc, signal.SIGKILL)  # the group may hold children even after the leader exited
    _wait_all(procs, 5.0)
    # A killed process can take a moment to go (a vLLM engine core unmapping its memory):
    # return only when no role's process group has a live member left.
    deadline = time.monotonic() + 15.0
    while any(group_members(p.pid) for p in procs.values()) and time.monotonic() < deadline:
        time.sleep(0.1)


def group_members(pgid: int) -> list[int]:
    """Live (not zombie) processes of a process group, read from /proc (Linux)."""
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue  # gone while we looked
        if fields[0] != "Z" and int(fields[2]) == pgid:
            members.append(int(stat.parent.name))
    return members


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def summary_line(record: dict, steps: int) -> str:
    done = int(record.get("step", 0))
    bar = "#" * int(20 * done / max(steps, 1))
    parts = [f"[{bar:<20}] step {done}/{steps}", f"reward {record.get('reward/mean', float('nan')):.3f}"]
    for key, label in (("env/correct", "correct"), ("loss:sum", "loss"), ("kl_sampler_learner:mean", "kl"),
                       ("eval/accuracy", "eval acc"), ("staleness/max", "stale"), ("learner/idle_frac", "learner idle"),
                       ("explorer/sampler_busy_frac", "sampler busy"), ("time/step_s", "s/step")):
        if record.get(key) is not None:
            parts.append(f"{label} {record[key]:.3g}")
    return "  ".join(parts)


def run(config: RunConfig, config_path: str, sets: list[str], resume: bool = False,
        timeout_s: float | None = None, quiet: bool = False) -> int:
    """Start the roles, print a line per learner step, return 0 when the learner finished."""
    run_dir = config.run_dir
    (run_dir / "logs").mkdir(parents=True, exist_ok=True)
    (run_dir / "config.json").write_bytes(dump(config))
    metrics_path = run_dir / "metrics.jsonl"
    seen = len(read_metrics(metrics_path))
    procs: dict[str, subprocess.Popen] = {}
    interrupted = False

    def on_signal(signum, frame):
        nonlocal interrupted
        interrupted = True

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    start = time.monotonic()
    for role in ROLES:
        failure_file(run_dir, role).unlink(missing_ok=True)  # from an earlier run in this directory
    try:
        for role in ROLES:
            log_file = open(run_dir / "logs" / f"{role}.log", "ab")
            procs[role] = subprocess.Popen(role_command(role, config_path, sets, resume), stdout=log_file,
                                           stderr=subprocess.STDOUT, start_new_session=True)
            log_file.close()
        (run_dir / "pids.json").write_text(json.dumps({r: p.pid for r, p in procs.items()}))
        while True:
            time.sleep(POLL_S)
            records = read_metrics(metrics_path)
            for record in records[seen:]:
                if not quiet:
                    print(summary_line(record, config.learner.steps), flush=True)
            seen = len(records)
            if interrupted:
                print("interrupted: stopping all roles", file=sys.stderr)
                return 130
            learner = procs["learner"].poll()
            if learner == 0:
                _wait_all(procs, 60.0)  # the others stop on the learner's Shutdown; stop_all gets stragglers
                return 0
            failed = {r: p.returncode for r, p in procs.items() if p.poll() not in (None, 0)}
            if failed:
                for role, code in failed.items():
                    log_path = run_dir / "logs" / f"{role}.log"
                    print(f"role {role} failed: {_failure(run_dir, role, code)}", file=sys.stderr)
                    print(f"--- last lines of {log_path} ---\n{_tail(log_path)}\n---", file=sys.stderr)
                    print(f"role {role} failed: {_failure(run_dir, role, code)}; stopping all roles", file=sys.stderr)
                return 1
            if timeout_s is not None and time.monotonic() - start > timeout_s:
                print(f"run did not finish within {timeout_s:.0f} s", file=sys.stderr)
                return 124
    finally:
        stop_all(procs)
        for s, handler in previous.items():
            signal.signal(s, handler)


def run_to_end(config: RunConfig, filename: str) -> list[dict]:
    """What the demo and the recipes do with a config built in Python: write it as JSON to
    run_dir/filename, run it as `rlpipe run` would, and return the learner's metric records.
    Raises SystemExit if a role failed."""
    path = config.run_dir / filename
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(dump(config))
    code = run(load(path), str(path), [])
    if code != 0:
        raise SystemExit(f"the pipeline failed (exit code {code}); see {config.run_dir / 'logs'}")
    return read_metrics(config.run_dir / "metrics.jsonl")


def _wait_all(procs: dict[str, subprocess.Popen], timeout_s: float) -> None:
    """Wait for every process, timeout_s in all."""
    deadline = time.monotonic() + timeout_s
    for proc in procs.values():
        try:
            proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass


def _failure(run_dir: Path, role: str, code: int) -> str:
    try:
        return failure_file(run_dir, role).read_text().strip()
    except FileNotFoundError:  # killed, or failed before it could say why
        return f"exit code {code}" + (f" (signal {-code})" if code < 0 else "")


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def buffer_stats(config: RunConfig) -> dict:
    path = config.run_dir / "buffer_stats.json"
    return json.loads(path.read_text()) if path.exists() else {}
