"""What every role process (`rlpipe buffer | learner | explorer`) does to be supervised.

`rlpipe run` (launch.py) starts the roles and watches them from outside: their exit codes,
their heartbeat files, their failure files. This is the inside of that contract:

    supervised(role, config)   beat the heartbeat file while the role runs; an error is logged
                               with its traceback, its line recorded for the launcher to print,
                               and the process ends: exit 3 for an error no restart can fix
                               (errors.Unrecoverable: the run stops), 1 for any other (restarted)
    stop_on_sigterm()          SIGTERM unwinds the role (KeyboardInterrupt, through its finally
                               blocks); the role then exits EXIT_SIGTERM, not 0
    die_with_launcher()        the role gets SIGTERM when the launcher dies, even by SIGKILL
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

from rlpipe.pipeline.errors import EXIT_UNRECOVERABLE, Unrecoverable
from rlpipe.pipeline.launch import HEARTBEAT_S, LAUNCHER_ENV, failure_file, heartbeat_file

log = logging.getLogger("rlpipe")

EXIT_SIGTERM = 128 + signal.SIGTERM
"""How a buffer or explorer stopped by SIGTERM exits: only a stop the learner asked for
(Shutdown) is exit 0, which `rlpipe run` takes for "finished" rather than restarting the role."""


def record_failure(run_dir: Path, role: str, error: BaseException) -> None:
    """What a failing role leaves for the launcher to print: its exception line."""
    path = failure_file(run_dir, role)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"{type(error).__name__}: {error}\n")


def start_heartbeat(run_dir: Path, role: str) -> threading.Event:
    """Touch the role's heartbeat file every HEARTBEAT_S from a daemon thread, until the
    returned event is set. A frozen process (SIGSTOP, a hang holding the GIL) stops touching it."""
    path = heartbeat_file(run_dir, role)
    path.parent.mkdir(parents=True, exist_ok=True)
    stop = threading.Event()

    def beat():
        while not stop.is_set():
            path.touch()
            stop.wait(HEARTBEAT_S)

    threading.Thread(target=beat, name="rlpipe-heartbeat", daemon=True).start()
    return stop


@contextlib.contextmanager
def supervised(role: str, config) -> Iterator[None]:
    """Run the body as `role` of config's run: its heartbeat beats meanwhile, and its error
    ends the process with the exit code the launcher acts on (see the module's docstring)."""
    beating = start_heartbeat(config.run_dir, role)
    try:
        yield
    except Exception as err:
        log.error("%s failed: %s: %s", role, type(err).__name__, err, exc_info=True)
        record_failure(config.run_dir, role, err)
        sys.exit(EXIT_UNRECOVERABLE if isinstance(err, Unrecoverable) else 1)
    finally:
        beating.set()


def stop_on_sigterm() -> threading.Event:
    """From now on SIGTERM sets the returned event and raises KeyboardInterrupt in the main
    thread, which unwinds through finally blocks, closing sockets."""
    stop = threading.Event()

    def handler(signum, frame):
        stop.set()
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, handler)
    return stop


def die_with_launcher() -> None:
    """Called first thing by a role that `rlpipe run` started (it names itself in LAUNCHER_ENV):
    the role gets SIGTERM when the launcher dies, even by SIGKILL, so no role outlives it holding
    the run's store, ports and explorer ids (Linux). Done in the role rather than in a
    preexec_fn, which can deadlock in a launcher that has threads (the demo's warm-up)."""
    launcher = os.environ.pop(LAUNCHER_ENV, None)  # not for the role's own children
    if launcher is None or not sys.platform.startswith("linux"):
        return
    import ctypes

    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    if os.getppid() != int(launcher):  # the launcher died before the line above
        os.kill(os.getpid(), signal.SIGTERM)
