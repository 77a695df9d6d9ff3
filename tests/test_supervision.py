"""The launcher's supervision, on real processes: small Python programs stand in for the roles
(each beats its heartbeat like a role does, then lives, crashes or freezes on cue), so the
restart, backoff, heartbeat and give-up rules are tested without a model. The whole pipeline
under SIGKILL is tests/test_chaos.py."""

import json
import os
import signal
import sys
import time

import pytest

from rlpipe.pipeline import launch
from rlpipe.pipeline.config import RunConfig
from rlpipe.pipeline.errors import EXIT_UNRECOVERABLE

ROLE = """
import sys, time
from pathlib import Path
from rlpipe.pipeline.role import start_heartbeat
run_dir, role, behaviour = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
starts = run_dir / f"{role}.starts"
n = int(starts.read_text()) + 1 if starts.exists() else 1
starts.write_text(str(n))
start_heartbeat(run_dir, role)
if behaviour == "crash_once" and n == 1:
    time.sleep(0.5); sys.exit(1)
if behaviour == "always_crash":
    sys.exit(1)
if behaviour == "unrecoverable":
    (run_dir / "logs" / f"{role}.failed").write_text("Unrecoverable: the adapter does not fit")
    sys.exit(%d)
if behaviour == "child":  # leaves a child in its process group, as the explorer's engine core
    import subprocess
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    (run_dir / f"{role}.child").write_text(str(child.pid))
    if n == 1:
        time.sleep(0.5); sys.exit(1)
time.sleep(600)
""" % EXIT_UNRECOVERABLE


def supervisor(tmp_path, behaviours: dict[str, str], **supervision) -> launch.Supervisor:
    config = RunConfig(name="sup", runs_dir=str(tmp_path))
    for key, value in {"backoff_s": 0.2, "max_backoff_s": 1.0, **supervision}.items():
        setattr(config.supervision, key, value)
    (config.run_dir / "logs").mkdir(parents=True)
    sup = launch.Supervisor(config, "unused.toml", [], resume=False)
    for role in sup.roles.values():
        role.command = [sys.executable, "-c", ROLE, str(config.run_dir), role.name, behaviours.get(role.name, "live")]
    sup.learner_resume = sup.roles["learner"].command
    for role in sup.roles.values():
        sup.start(role)
    return sup


def watch(sup: launch.Supervisor, done=lambda: False, timeout_s: float = 60.0) -> str | None:
    """Run the supervisor's loop until done() holds or a role stops the run (that role is
    returned). Waiting on the event, never a fixed window: a role's Python start-up alone takes
    over a second on a loaded machine, which made fixed windows flaky."""
    start = time.monotonic()
    while not done():
        assert time.monotonic() - start < timeout_s, f"not within {timeout_s} s"
        time.sleep(0.05)
        if (stopped := sup.check(time.monotonic())) is not None:
            return stopped
    return None


def starts(sup, role: str) -> int:
    path = sup.run_dir / f"{role}.starts"
    return int(path.read_text()) if path.exists() else 0


@pytest.fixture
def cleanup():
    sups = []
    yield sups.append
    for sup in sups:
        launch.stop_all(sup.procs, grace_s=2)


@pytest.mark.slow
def test_a_crashed_role_is_restarted_and_counted(tmp_path, capsys, cleanup):
    sup = supervisor(tmp_path, {"buffer": "crash_once"})
    cleanup(sup)
    assert watch(sup, lambda: starts(sup, "buffer") == 2) is None
    assert starts(sup, "buffer") == 2 and starts(sup, "learner") == 1
    assert sup.roles["buffer"].proc.poll() is None  # the second one lives
    assert launch.read_restarts(sup.run_dir) == {"buffer": 1}
    assert "role buffer died (exit code 1): restart 1/10" in capsys.readouterr().err


def test_an_unrecoverable_error_stops_the_run_without_restart(tmp_path, capsys, cleanup):
    sup = supervisor(tmp_path, {"explorer": "unrecoverable"})
    cleanup(sup)
    assert watch(sup) == "explorer"
    assert starts(sup, "explorer") == 1
    assert "role explorer failed: Unrecoverable: the adapter does not fit" in capsys.readouterr().err
    assert launch.read_restarts(sup.run_dir) == {}


def test_restarts_are_bounded(tmp_path, capsys, cleanup):
    sup = supervisor(tmp_path, {"learner": "always_crash"}, max_restarts=2)
    cleanup(sup)
    assert watch(sup) == "learner"
    assert starts(sup, "learner") == 3  # the first start and 2 restarts
    assert "after 2 restarts, the most supervision.max_restarts allows" in capsys.readouterr().err
    assert launch.read_restarts(sup.run_dir) == {"learner": 2}


@pytest.mark.slow
def test_a_frozen_role_is_killed_and_restarted(tmp_path, capsys, cleanup):
    sup = supervisor(tmp_path, {}, heartbeat_timeout_s=2.0)
    cleanup(sup)
    assert watch(sup, lambda: starts(sup, "learner") == 1) is None
    frozen = sup.roles["learner"].proc
    time.sleep(0.5)  # its heartbeat thread is running (start_heartbeat comes right after the count)
    os.kill(frozen.pid, signal.SIGSTOP)  # alive, but it answers nothing: its heartbeat stops
    assert watch(sup, lambda: starts(sup, "learner") == 2) is None
    assert frozen.wait(timeout=10) == -signal.SIGKILL
    assert starts(sup, "learner") == 2 and sup.roles["learner"].proc.poll() is None
    assert "role learner: no heartbeat for 2 s: killing it" in capsys.readouterr().err


def test_what_a_dead_role_started_goes_with_it(tmp_path, cleanup):
    sup = supervisor(tmp_path, {"explorer": "child"})
    cleanup(sup)
    child_file = sup.run_dir / "explorer.child"
    deadline = time.monotonic() + 20
    while not child_file.exists() and time.monotonic() < deadline:  # the role is still starting (a loaded machine)
        time.sleep(0.05)
    time.sleep(0.1)
    first_child = int(child_file.read_text())
    assert watch(sup, lambda: starts(sup, "explorer") == 2) is None
    # The first explorer's child (think: its vLLM engine core) was killed before the restart.
    assert not os.path.exists(f"/proc/{first_child}") or open(f"/proc/{first_child}/stat").read().split()[2] == "Z"


def test_a_directory_holding_a_run_is_refused_without_resume(tmp_path, capsys):
    config = RunConfig(name="taken", runs_dir=str(tmp_path))
    config.run_dir.mkdir(parents=True)
    (config.run_dir / "run.json").write_text(json.dumps({"run_id": "abc"}))
    assert launch.run(config, "unused.toml", []) == 2
    err = capsys.readouterr().err
    assert "already holds a run (run.json)" in err and "--resume" in err
    assert not (config.run_dir / "logs").exists()  # nothing was started


def test_a_role_that_ran_healthy_gets_its_budget_back(tmp_path, cleanup):
    sup = supervisor(tmp_path, {"buffer": "crash_once"}, healthy_s=1.0)
    cleanup(sup)
    buffer = sup.roles["buffer"]
    first = buffer.started
    assert watch(sup, lambda: buffer.restarts_here == 1 and buffer.started != first) is None  # crashed, restarted
    restarted = buffer.started
    assert watch(sup, lambda: buffer.restarts_here == 0) is None  # the restarted one ran longer than healthy_s
    assert time.monotonic() - restarted >= 1.0 and buffer.started == restarted and starts(sup, "buffer") == 2
    assert launch.read_restarts(sup.run_dir) == {"buffer": 1}  # the count of what happened stays


def test_roles_die_with_their_launcher(tmp_path):
    # A launcher killed outright (SIGKILL, the OOM killer) must not leave roles holding the
    # run's store, ports and explorer ids.
    script = f"""
import sys
from rlpipe.pipeline.config import RunConfig
from rlpipe.pipeline import launch
config = RunConfig(name="orphan", runs_dir={str(tmp_path)!r})
(config.run_dir / "logs").mkdir(parents=True)
sup = launch.Supervisor(config, "unused.toml", [], resume=False)
for role in sup.roles.values():
    role.command = [sys.executable, "-c", "from rlpipe.pipeline.role import die_with_launcher; "
                                          "die_with_launcher(); import time; time.sleep(600)"]
    sup.start(role)
print(" ".join(str(r.proc.pid) for r in sup.roles.values()), flush=True)
import time; time.sleep(600)
"""
    import subprocess

    launcher = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    pids = [int(p) for p in launcher.stdout.readline().split()]
    assert len(pids) == 3 and all(os.path.exists(f"/proc/{p}") for p in pids)
    launcher.kill()
    launcher.wait(timeout=10)
    deadline = time.monotonic() + 10
    alive = lambda: [p for p in pids if os.path.exists(f"/proc/{p}") and open(f"/proc/{p}/stat").read().split()[2] != "Z"]  # noqa: E731
    while alive() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not alive()
