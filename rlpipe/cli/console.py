"""What a person sees while a run goes.

Engines write to the process's stdout and stderr from places rlpipe does not control (vLLM's
loggers, its engine-core child process, Triton, transformers' progress bars), so the launcher
points file descriptors 1 and 2 at a log file (engine_output_to) and keeps the terminal for
itself: say() and warn() write there, and RunDisplay shows the run on it, as a rich live
display on a terminal or as a plain line every N steps otherwise.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO

_terminal: dict[str, IO[str]] = {}
"""The launcher's real stdout and stderr while engine_output_to is in force."""


def out() -> IO[str]:
    return _terminal.get("out", sys.stdout)


def err() -> IO[str]:
    return _terminal.get("err", sys.stderr)


def say(text: str) -> None:
    print(text, file=out(), flush=True)


def warn(text: str) -> None:
    print(text, file=err(), flush=True)


@contextlib.contextmanager
def engine_output_to(log_path: str | Path) -> Iterator[None]:
    """Send everything written to fds 1 and 2 (this process and the children it starts
    meanwhile) to log_path, and say()/warn() to the terminal they pointed at before.
    Nested use keeps the outermost redirection."""
    if _terminal:
        yield
        return
    log_path = Path(log_path)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log_fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    sys.stdout.flush()
    sys.stderr.flush()
    saved = {name: os.dup(fd) for name, fd in (("out", 1), ("err", 2))}
    os.dup2(log_fd, 1)
    os.dup2(log_fd, 2)
    os.close(log_fd)
    for name, fd in saved.items():
        _terminal[name] = open(os.dup(fd), "w", buffering=1, closefd=True)
    try:
        yield
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        for name, fd in saved.items():
            _terminal.pop(name).close()
            os.dup2(fd, 1 if name == "out" else 2)
            os.close(fd)


def is_terminal(stream: IO[str]) -> bool:
    try:
        return os.isatty(stream.fileno())
    except (AttributeError, OSError, ValueError):
        return False


def _fmt(value, spec: str = ".3g") -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return format(value, spec)


def _duration(seconds: float) -> str:
    if not math.isfinite(seconds) or seconds < 0:
        return "-"
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}" if seconds >= 3600 else f"{seconds // 60}:{seconds % 60:02d}"


def figures(record: dict, steps: int, eta_s: float) -> list[tuple[str, str]]:
    """(label, value) pairs of one learner step, in display order; absent metrics are left out."""
    done = int(record.get("step", 0))
    rows = [("step", f"{done}/{steps}"), ("ETA", _duration(eta_s)), ("reward", _fmt(record.get("reward/mean"), ".3f"))]
    env = sorted(k for k in record if k.startswith("env/"))[:4]
    rows += [(k.removeprefix("env/"), _fmt(record[k])) for k in env]
    drops = sum(v for k, v in record.items() if k.startswith("buffer/dropped_") and isinstance(v, (int, float)))
    for key, label, spec in (("eval/accuracy", "eval acc", ".3f"), ("tokens/sampled_per_s", "sampled tok/s", ".0f"),
                             ("tokens/trained_per_s", "trained tok/s", ".0f"), ("loss/sum", "loss", ".3g"),
                             ("kl/sampler_learner", "kl mismatch", ".2g"), ("kl/ref", "kl to base", ".3g"),
                             ("staleness/mean", "lag mean", ".2f"), ("staleness/max", "lag max", ".0f"),
                             ("buffer/no_signal_frac", "no signal", ".0%"),
                             ("time/learner_idle_frac", "learner idle", ".0%"),
                             ("time/sampler_busy_frac", "sampler busy", ".0%")):
        if record.get(key) is not None:
            rows.append((label, _fmt(record[key], spec)))
    rows.append(("drops", f"{drops:.0f}"))
    return rows


NO_SIGNAL_WARN = 0.5
"""The console warns when more than this share of the groups tried for a batch carried no signal."""
NO_SIGNAL_WARN_EVERY = 20
"""...and again at most every this many steps while it lasts."""


def no_signal_warning(record: dict, warned_at: int | None) -> str | None:
    """The warning for a step where most groups carried no signal, or None (not so, or said
    less than NO_SIGNAL_WARN_EVERY steps ago)."""
    frac, step = record.get("buffer/no_signal_frac"), int(record.get("step", 0))
    if not isinstance(frac, (int, float)) or not frac > NO_SIGNAL_WARN:
        return None
    if warned_at is not None and step - warned_at < NO_SIGNAL_WARN_EVERY:
        return None
    tried = record.get("buffer/tried") or 0
    return (f"step {step}: {frac:.0%} of the {tried:.0f} groups tried carried no signal (every reward equal): "
            f"the task is nearly solved or out of reach, and sampling hunts for the rest "
            f"(buffer.oversample, buffer.max_tried_batches, buffer.at_max_tried bound it)")


def plain_line(record: dict, steps: int, eta_s: float = math.nan) -> str:
    return "  ".join(f"{label} {value}" for label, value in figures(record, steps, eta_s))


class RunDisplay:
    """The run on the console: update(record) per learner step. A live rich panel on a
    terminal; otherwise a plain line every `every` steps (0 = about 20 lines a run) and at
    the last step; nothing when quiet. note() prints a message above the display."""

    def __init__(self, name: str, steps: int, *, quiet: bool = False, every: int = 0):
        self.name, self.steps, self.quiet = name, steps, quiet
        self.every = every or max(1, steps // 20)
        self.live = None
        self.started = time.monotonic()
        self.first_step: tuple[int, float] | None = None
        self.last: dict | None = None
        self.eta_s = math.nan
        self.warned_no_signal: int | None = None  # the step of the last no-signal warning

    def __enter__(self) -> RunDisplay:
        if not self.quiet and is_terminal(out()):
            from rich.console import Console
            from rich.live import Live

            # Drawn anew at each refresh, so the elapsed time ticks between steps. No redirection of
            # sys.stdout/stderr to the panel: what Python code prints stays in engine_output_to's log.
            self.live = Live(get_renderable=lambda: self._panel(self.last, self.eta_s), console=Console(file=out()),
                             refresh_per_second=2, transient=False, redirect_stdout=False, redirect_stderr=False)
            self.live.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self.live is not None:
            self.live.__exit__(*exc)
            self.live = None
        elif self.last is not None and not self.quiet and int(self.last.get("step", 0)) % self.every:
            say(plain_line(self.last, self.steps, 0.0))  # the final figures, if not just printed

    def eta(self, step: int) -> float:
        now = time.monotonic()
        if self.first_step is None:
            self.first_step = (step, now)
            return math.nan
        first, t0 = self.first_step
        return (now - t0) / max(step - first, 1) * (self.steps - step) if step > first else math.nan

    def update(self, record: dict) -> None:
        self.last = record
        step = int(record.get("step", 0))
        eta = self.eta_s = self.eta(step)
        if (warning := no_signal_warning(record, self.warned_no_signal)) is not None:
            self.warned_no_signal = step
            self.note(warning)
        if self.quiet:
            return
        if self.live is not None:
            self.live.refresh()
        elif step % self.every == 0:
            say(plain_line(record, self.steps, eta))

    def note(self, text: str) -> None:
        """A message for the person (a restart, a failure): shown even when quiet."""
        if self.live is not None:
            self.live.console.print(text, markup=False, highlight=False)
        else:
            warn(text)

    def _panel(self, record: dict | None = None, eta: float = math.nan):
        from rich.markup import escape
        from rich.panel import Panel
        from rich.progress_bar import ProgressBar
        from rich.table import Table

        done = int(record.get("step", 0)) if record else 0
        rows = figures(record, self.steps, eta)[2:] if record else []
        head = Table.grid(padding=(0, 2))
        head.add_row(ProgressBar(total=max(self.steps, 1), completed=done, width=40), f"step {done}/{self.steps}",
                     f"[dim]ETA[/dim] {_duration(eta)}" if record else "[dim]waiting for the first step[/dim]")
        body = Table.grid(padding=(0, 3))
        for i in range(0, len(rows), 4):
            body.add_row(*[f"[dim]{escape(label)}[/dim] {escape(value)}" for label, value in rows[i:i + 4]])
        page = Table.grid()
        page.add_row(head)
        page.add_row(body)
        elapsed = _duration(time.monotonic() - self.started)
        return Panel.fit(page, title=f"rlpipe · {escape(self.name)}", subtitle=f"elapsed {elapsed}", title_align="left")
