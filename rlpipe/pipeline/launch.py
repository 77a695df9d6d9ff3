"""`rlpipe run`: the roles as processes on one machine, supervised until done: the buffer,
the learner and explorer.count explorers (one role "explorer", with id explorer-0; or, with
count > 1, roles explorer-0 ... explorer-<count - 1>, each its own process and sampling engine,
restarted alone if it dies; they share the buffer's admission budget, admission.py).
(About 420 lines, over the 400 a module keeps to: starting, watching, restarting and stopping
the roles all act on one table of processes, read here top to bottom.)

Each role runs in its own session (process group), so stopping it also stops what it
started (the vLLM engine core). Ctrl-C stops all of them: SIGTERM, then SIGKILL after a
grace period. No orphans are left behind.

Supervision (config [supervision]): a role that dies (non-zero exit, a signal, or no
heartbeat for heartbeat_timeout_s) is restarted with a doubling backoff, at most max_restarts
times; each restart is printed and counted in run_dir/restarts.json. A restarted learner
resumes from its last checkpoint, a restarted buffer replays its store, a restarted explorer
(same id) re-sends its outbox and loads the newest adapter. A role that exits with
EXIT_UNRECOVERABLE (an error no restart can fix), or that has used up its restarts, stops
the run at once: the launcher prints the role and its error line (role.record_failure, written
by the `rlpipe <role>` command) and the end of the role's log. role.py is the roles' side of this.

A run directory belongs to one run: starting into one that already holds a run is refused
unless --resume is given (then every role continues from its durable state).
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from rlpipe.cli import console
from rlpipe.metrics import read_metrics
from rlpipe.pipeline import identity
from rlpipe.pipeline.addresses import pick_addresses, taken_address, with_addresses
from rlpipe.pipeline.config import RunConfig, dump, load, redacted, resolve_train_unembed
from rlpipe.pipeline.errors import EXIT_UNRECOVERABLE
from rlpipe.training.checkpoint import write_json_atomic

ROLES = ("buffer", "learner", "explorer")
"""The roles of a run with one explorer; with explorer.count > 1 "explorer" is replaced by
explorer-0, explorer-1, ... (role_names)."""
EXPLORER_ID = "explorer-0"
GRACE_S = 15.0
POLL_S = 0.5
HEARTBEAT_S = 1.0
RESTARTS_FILE = "restarts.json"
LAUNCHER_ENV = "RLPIPE_LAUNCHER_PID"
LAUNCHER_LOG = "launcher.log"
"""run_dir/launcher.log: what engines and libraries print in the launcher process (and in
anything it starts outside the roles, such as the demo's evaluation engine)."""


def failure_file(run_dir: Path, role: str) -> Path:
    return Path(run_dir) / "logs" / f"{role}.failed"


def heartbeat_file(run_dir: Path, role: str) -> Path:
    return Path(run_dir) / "logs" / f"{role}.heartbeat"


def holds_a_run(run_dir: Path) -> list[str]:
    """What in run_dir shows an earlier run (empty if none)."""
    names = (identity.RUN_FILE, "metrics.jsonl", "buffer", "learner")
    explorers = sorted(p.name for p in Path(run_dir).glob("explorer-*") if p.is_dir())
    return [n for n in names if (Path(run_dir) / n).exists()] + explorers


def explorer_ids(count: int) -> list[str]:
    """The stable ids of the explorers `rlpipe run` starts: a restarted one finds its outbox."""
    return [f"explorer-{i}" for i in range(count)]


def explorer_role(count: int, explorer_id: str | None) -> str:
    """An explorer's role name (its logs/<role>.log, heartbeat, failure file, restarts.json
    key): "explorer" in a run with one explorer, else its id."""
    return "explorer" if count == 1 or not explorer_id else explorer_id


def role_names(config: RunConfig) -> dict[str, str | None]:
    """role name -> explorer id (None for the buffer and the learner), in start order."""
    count = config.explorer.count
    return {"buffer": None, "learner": None, **{explorer_role(count, i): i for i in explorer_ids(count)}}


def role_command(role: str, config_path: str, sets: list[str], resume: bool,
                 explorer_id: str | None = None, device: str = "") -> list[str]:
    """device: the explorer's own (explorer.devices), after the run's --set items so it wins."""
    cmd = [sys.executable, "-m", "rlpipe.cli", "explorer" if explorer_id else role, config_path]
    for item in sets + ([f"explorer.engine.device={json.dumps(device)}"] if device else []):
        cmd += ["--set", item]
    if resume and role == "learner":
        cmd.append("--resume")
    if explorer_id or role == "explorer":
        cmd += ["--id", explorer_id or EXPLORER_ID]  # a stable id: a restarted explorer finds its outbox
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
    _wait_groups_gone([p.pid for p in procs.values()], 15.0)


def _wait_groups_gone(pgids: list[int], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while any(group_members(g) for g in pgids) and time.monotonic() < deadline:
        time.sleep(0.1)


def group_members(pgid: int) -> list[int]:
    """Live (not zombie) processes of a process group, read from /proc (Linux)."""
    return live_processes(group=pgid)


def live_processes(*, group: int | None = None, parent: int | None = None) -> list[int]:
    """Live (not zombie) processes of a process group, or children of a process (Linux /proc)."""
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue  # gone while we looked
        if fields[0] != "Z" and (group is None or int(fields[2]) == group) and (parent is None or int(fields[1]) == parent):
            members.append(int(stat.parent.name))
    return members


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def read_restarts(run_dir: Path) -> dict[str, int]:
    path = Path(run_dir) / RESTARTS_FILE
    return json.loads(path.read_text()) if path.exists() else {}


@dataclass
class Role:
    name: str
    command: list[str]
    proc: subprocess.Popen | None = None
    started: float = 0.0
    restart_at: float | None = None
    restarts_here: int = 0
    """Restarts by this launcher (the budget); restarts.json also keeps earlier launches'."""
    finished: bool = False


class Supervisor:
    def __init__(self, config: RunConfig, config_path: str, sets: list[str], resume: bool):
        self.config = config
        self.run_dir = config.run_dir
        devices = dict(zip(explorer_ids(config.explorer.count), config.explorer.devices))
        self.roles = {r: Role(r, role_command(r, config_path, sets, resume, explorer_id, devices.get(explorer_id, "")))
                      for r, explorer_id in role_names(config).items()}
        # A restarted learner always resumes from its checkpoint.
        self.learner_resume = role_command("learner", config_path, sets, True)
        self.restarts = read_restarts(self.run_dir)
        self.note = console.warn

    @property
    def procs(self) -> dict[str, subprocess.Popen]:
        return {r.name: r.proc for r in self.roles.values() if r.proc is not None}

    def start(self, role: Role) -> None:
        failure_file(self.run_dir, role.name).unlink(missing_ok=True)
        heartbeat_file(self.run_dir, role.name).unlink(missing_ok=True)
        with open(self.run_dir / "logs" / f"{role.name}.log", "ab") as log_file:
            role.proc = subprocess.Popen(role.command, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True,
                                         env={**os.environ, LAUNCHER_ENV: str(os.getpid())})
        role.started = time.monotonic()
        role.restart_at = None
        write_json_atomic(self.run_dir / "pids.json", {r: p.pid for r, p in self.procs.items()}, indent=1)

    def check(self, now: float) -> str | None:
        """Restart what died or hangs; the reason the run must stop, or None."""
        sup = self.config.supervision
        for role in self.roles.values():
            if role.finished:
                continue
            if role.restart_at is not None:
                if now >= role.restart_at:
                    self.start(role)
                continue
            code = role.proc.poll()
            if code is None:
                if role.restarts_here and now - role.started > sup.healthy_s:
                    role.restarts_here = 0  # healthy again: a full budget, the shortest backoff
                if self._hung(role, now, sup.heartbeat_timeout_s):
                    self.note(f"role {role.name}: no heartbeat for {sup.heartbeat_timeout_s:.0f} s: killing it")
                    _signal_group(role.proc, signal.SIGKILL)
                continue
            if code == 0:
                role.finished = True  # buffer and explorer end with 0 after the learner's Shutdown
                continue
            error = _failure(self.run_dir, role.name, code)
            if code == EXIT_UNRECOVERABLE or role.restarts_here >= sup.max_restarts:
                self._report(role.name, code, "" if code == EXIT_UNRECOVERABLE else
                             f" (after {role.restarts_here} restarts, the most supervision.max_restarts allows)")
                return role.name
            # What the dead role started (a vLLM engine core) goes with it before the new one starts.
            _signal_group(role.proc, signal.SIGKILL)
            _wait_groups_gone([role.proc.pid], 15.0)
            backoff = min(sup.backoff_s * 2 ** role.restarts_here, sup.max_backoff_s)
            role.restarts_here += 1
            self.restarts[role.name] = self.restarts.get(role.name, 0) + 1
            write_json_atomic(self.run_dir / RESTARTS_FILE, self.restarts, indent=1)
            self.note(f"role {role.name} died ({error}): restart {role.restarts_here}/{sup.max_restarts} "
                      f"in {backoff:.0f} s")
            if role.name == "learner":
                role.command = self.learner_resume
            role.restart_at = now + backoff
        return None

    def _hung(self, role: Role, now: float, timeout_s: float) -> bool:
        try:
            age = time.time() - heartbeat_file(self.run_dir, role.name).stat().st_mtime
        except FileNotFoundError:
            age = now - role.started  # not beating yet (still importing): count from its start
        return min(age, now - role.started) > timeout_s

    def _report(self, role: str, code: int, note: str) -> None:
        log_path = self.run_dir / "logs" / f"{role}.log"
        error = _failure(self.run_dir, role, code)
        self.note(f"role {role} failed: {error}{note}")
        self.note(f"--- last lines of {log_path} ---\n{_tail(log_path)}\n---")
        self.note(f"role {role} failed: {error}{note}; stopping all roles")


@contextlib.contextmanager
def launcher_output(run_dir: Path, stop_engines: bool = False) -> Iterator[None]:
    """For work done in the launcher itself (the demo's and recipes' SFT warm-ups and
    evaluations): what engines print goes to run_dir/launcher.log, results through
    console.say to the terminal. stop_engines: shut this process's sampling engines down
    before the terminal is handed back, so their shutdown messages go to the log too
    (not for a caller that shares an engine beyond this block, such as a test session)."""
    with console.engine_output_to(Path(run_dir) / LAUNCHER_LOG):
        try:
            yield
        finally:
            if stop_engines:
                from rlpipe.sampling import shutdown_engines

                shutdown_engines()


def run(config: RunConfig, config_path: str, sets: list[str], resume: bool = False,
        timeout_s: float | None = None, quiet: bool = False) -> int:
    """Start the roles, show the run on the console, restart roles that die; return 0 when
    the learner finished, 1 when a role failed for good, 2 when the run directory or an
    address is taken or the config asks what the sampler cannot serve. Engine output goes
    to run_dir/launcher.log, not the console."""
    run_dir = config.run_dir
    if not resume and (found := holds_a_run(run_dir)):
        console.warn(f"rlpipe: {run_dir} already holds a run ({', '.join(found)}): pass --resume to continue it, "
                     f"or choose another name or runs_dir")
        return 2
    if (taken := taken_address(config)) is not None:
        console.warn(f"rlpipe: {taken} is already in use (another run on this machine?): leave [addresses] unset "
                     f"so rlpipe run picks free ports, or choose other ports")
        return 2
    for package, project in (("wandb", config.logging.wandb_project), ("trackio", config.logging.trackio_project)):
        if project and importlib.util.find_spec(package) is None:
            console.warn(f"rlpipe: logging.{package}_project is set but {package} is not installed "
                         f"(pip install {package}): logging to metrics.jsonl and TensorBoard only")
    (run_dir / "logs").mkdir(parents=True, exist_ok=True)
    with console.engine_output_to(run_dir / LAUNCHER_LOG):
        try:  # imports vLLM to ask what it serves: inside the redirection, or its warnings reach the console
            resolve_train_unembed(config)
        except ValueError as err:
            console.warn(f"rlpipe: bad config {config_path}: {err}")
            return 2
        identity.run_id(run_dir)  # made once, before any role needs it
        picked = pick_addresses(config)
        sets = [*sets, *(f"{k}={v}" for k, v in picked.items())]
        (run_dir / "config.json").write_bytes(dump(redacted(with_addresses(config, picked))))
        with console.RunDisplay(config.name, config.learner.steps, quiet=quiet,
                                every=config.logging.console_every) as display:
            code = _supervise(config, config_path, sets, resume, timeout_s, display)
        if code in (0, 124, 130):
            write_curves(run_dir, quiet)  # matplotlib's first-use messages go to the log too
    return code


def write_curves(run_dir: Path, quiet: bool = False) -> Path | None:
    """run_dir/curves.png from the run's metrics (rlpipe plot); a plot that fails is logged,
    never the run's failure."""
    try:
        from rlpipe.cli.plot import plot_run

        path = plot_run(run_dir)
    except (Exception, SystemExit) as err:  # noqa: BLE001
        console.warn(f"rlpipe: no curves.png: {err}")
        return None
    if not quiet:
        console.say(f"curves: {path}")
    return path


def _supervise(config: RunConfig, config_path: str, sets: list[str], resume: bool, timeout_s: float | None,
               display: console.RunDisplay) -> int:
    run_dir = config.run_dir
    metrics_path = run_dir / "metrics.jsonl"
    seen = len(read_metrics(metrics_path))
    supervisor = Supervisor(config, config_path, sets, resume)
    supervisor.note = display.note
    interrupted = False

    def on_signal(signum, frame):
        nonlocal interrupted
        interrupted = True

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    start = time.monotonic()
    try:
        for role in supervisor.roles.values():
            supervisor.start(role)
        while True:
            time.sleep(POLL_S)
            records = read_metrics(metrics_path)
            for record in records[seen:]:
                display.update(record)
            seen = len(records)
            if interrupted:
                display.note("interrupted: stopping all roles")
                return 130
            learner = supervisor.roles["learner"]
            if learner.restart_at is None and learner.proc.poll() == 0:
                _wait_all(supervisor.procs, 60.0)  # the others stop on the learner's Shutdown; stop_all gets stragglers
                return 0
            if supervisor.check(time.monotonic()) is not None:
                return 1
            if timeout_s is not None and time.monotonic() - start > timeout_s:
                display.note(f"run did not finish within {timeout_s:.0f} s")
                return 124
    finally:
        stop_all(supervisor.procs)
        for s, handler in previous.items():
            signal.signal(s, handler)


def clear_run(run_dir: Path) -> list[str]:
    """Remove what an earlier pipeline run left in run_dir (its store, checkpoints, logs and
    metrics; other files, such as an SFT warm-up next to it, stay). Returns what was removed."""
    names = [*holds_a_run(run_dir), "logs", RESTARTS_FILE, "buffer_stats.json", "pids.json", "tensorboard", "wandb",
             "curves.png"]
    removed = []
    for name in names:
        path = Path(run_dir) / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
        else:
            continue
        removed.append(name)
    return removed


def run_to_end(config: RunConfig, filename: str, replace: bool = False, quiet: bool = False,
               resume: bool = False) -> list[dict]:
    """What the demo and the recipes do with a config built in Python: write it as JSON to
    run_dir/filename, run it as `rlpipe run` would (the console display, curves.png at the
    end), and return the learner's metric records. replace: first remove an earlier run in
    the same directory (said on the console); resume: continue it. Raises SystemExit if the
    directory holds a run and neither is given, or if a role failed."""
    if not resume and (found := holds_a_run(config.run_dir)):
        if not replace:  # refused before anything of the earlier run is overwritten
            raise SystemExit(f"{config.run_dir} already holds a run ({', '.join(found)}): replace it, resume it, "
                             "or choose another name or runs_dir")
        console.say(f"replacing the earlier run in {config.run_dir}: removed {', '.join(clear_run(config.run_dir))}")
    path = config.run_dir / filename
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(dump(config))
    code = run(load(path), str(path), [], quiet=quiet, resume=resume)
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
