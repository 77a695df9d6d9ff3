"""`rlpipe status RUN_DIR [--json]`: is the run alive, how far is it, what went wrong.

Everything is read from files the roles and the launcher leave in the run directory, so it
works from another shell while the run goes, and after it ended or crashed:

    pids.json              role -> pid (the launcher, at each (re)start)
    logs/<role>.heartbeat  touched every second by a live role
    logs/<role>.failed     the exception line of a role that failed (removed at its restart)
    logs/<role>.log        the role's log: the last ERROR line or exception when there is no .failed
    restarts.json          restarts per role, across launches
    learner/latest.json    the newest checkpoint (read directly: the learner module imports torch)
    metrics.jsonl          one record per learner step
    config.json            the config the run was started with (learner.steps, heartbeat timeout)

A role is alive when its pid is a live process (not a zombie) and its heartbeat is younger
than supervision.heartbeat_timeout_s, the age at which the launcher takes it for frozen.
Linux only (/proc), as the launcher is.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

from rlpipe.metrics import read_metrics
from rlpipe.pipeline.config import LearnerConfig, SupervisionConfig, load
from rlpipe.pipeline.launch import RESTARTS_FILE, ROLES, failure_file, heartbeat_file
from rlpipe.cli.plot import number

KEY_METRICS = ("reward/mean", "env/correct", "eval/accuracy", "loss/sum", "kl/sampler_learner", "kl/ref",
               "tokens/sampled_per_s", "tokens/trained_per_s", "time/step_s", "staleness/mean", "staleness/max",
               "buffer/no_signal_frac")
LOG_TAIL_BYTES = 256 * 1024
"""How much of a role's log is searched for its last error: a vLLM log can be large."""
ERROR_LINE = re.compile(r"\bERROR\b")


def run_status(run_dir: str | Path) -> dict:
    """The facts `rlpipe status` shows, as JSON-ready data (see format_status for their meaning)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise SystemExit(f"rlpipe status: {run_dir} is not a directory")
    problems: list[str] = []  # files that could not be read: shown, never a crash of status itself
    steps, heartbeat_timeout_s = _config_facts(run_dir, problems)
    pids = _read_json(run_dir / "pids.json", problems) or {}
    restarts = _read_json(run_dir / RESTARTS_FILE, problems) or {}
    now = time.time()
    roles = {}
    # The usual three first, then any other the launcher named (explorer-0, explorer-1, ... with explorer.count > 1).
    usual = [r for r in ROLES if r != "explorer" or not any(str(p).startswith("explorer-") for p in pids)]
    for role in dict.fromkeys([*usual, *pids]):
        pid = pids.get(role)
        process = _process_state(pid) if isinstance(pid, int) else None
        heartbeat_age_s = _age_s(heartbeat_file(run_dir, role), now)
        error, source = last_error(run_dir, role)
        roles[role] = {
            "pid": pid,
            "process": process,
            "heartbeat_age_s": heartbeat_age_s,
            "alive": process == "running" and heartbeat_age_s is not None and heartbeat_age_s <= heartbeat_timeout_s,
            "restarts": restarts.get(role, 0),
            "last_error": error,
            "error_source": source,
        }
    records = read_metrics(run_dir / "metrics.jsonl")  # grouped names, old runs' too
    step = records[-1].get("step") if records else None
    last_time = (number(records[-1].get("time_end")) or number(records[-1].get("time"))) if records else None
    if any(r["alive"] for r in roles.values()):
        state = "running"
    elif isinstance(step, int) and steps is not None and step >= steps:
        state = "finished"
    elif any(failure_file(run_dir, role).exists() for role in roles):
        state = "failed"
    elif pids:
        state = "stopped"
    else:
        state = "not started"
    return {
        "run_dir": str(run_dir),
        "name": run_dir.resolve().name,
        "state": state,
        "step": step,
        "steps": steps,
        "last_step_age_s": round(now - last_time, 1) if last_time is not None else None,
        "roles": roles,
        "metrics": latest_metrics(records),
        "checkpoint": _read_json(run_dir / "learner" / "latest.json", problems),
        "restarts": restarts,
        "heartbeat_timeout_s": heartbeat_timeout_s,
        "problems": problems,
    }


def latest_metrics(records: list[dict]) -> dict[str, dict]:
    """KEY_METRICS -> {"value", "step"} from the newest record holding each: eval/accuracy is
    only logged every eval_every steps, so it usually comes from an earlier record."""
    found = {}
    for record in reversed(records):
        for name in KEY_METRICS:
            value = number(record.get(name))  # finite only: --json must stay valid JSON
            if name not in found and value is not None:
                found[name] = {"value": value, "step": record.get("step")}
        if len(found) == len(KEY_METRICS):
            break
    return {name: found[name] for name in KEY_METRICS if name in found}


def last_error(run_dir: Path, role: str) -> tuple[str | None, str | None]:
    """(the role's last error line, the file it came from): its .failed file, else the last
    ERROR log line or the exception line that ends a Traceback in its log, whichever is later."""
    failed = failure_file(run_dir, role)
    if failed.exists():
        text = failed.read_text(errors="replace").strip()
        return text or None, str(failed.relative_to(run_dir))
    log_path = Path(run_dir) / "logs" / f"{role}.log"
    try:
        with open(log_path, "rb") as f:
            f.seek(max(0, log_path.stat().st_size - LOG_TAIL_BYTES))
            lines = f.read().decode(errors="replace").splitlines()
    except FileNotFoundError:
        return None, None
    error = None
    in_traceback = False
    for line in lines:
        if line.startswith("Traceback (most recent call last)"):
            in_traceback = True
        elif in_traceback and line.strip() and not line[0].isspace():
            in_traceback = False  # the exception line closes the traceback
            # KeyboardInterrupt is how a role unwinds on the launcher's SIGTERM: a stop, not an error.
            if line.strip() != "KeyboardInterrupt":
                error = line.strip()
        elif ERROR_LINE.search(line):
            error = line.strip()
    return error, (str(log_path.relative_to(run_dir)) if error else None)


def main(args) -> None:
    """The CLI: args.run_dir, args.json."""
    status = run_status(args.run_dir)
    if args.json:
        print(json.dumps(status, indent=1))
        return
    from rich.console import Console

    console = Console()
    if console.is_terminal:
        print_rich(status, console)
    else:
        print(format_status(status))


# --------------------------------------------------------------------------- rendering


def headline(status: dict) -> str:
    steps = status["steps"]
    progress = f"step {status['step'] if status['step'] is not None else '-'}/{steps if steps is not None else '?'}"
    if status["last_step_age_s"] is not None:
        progress += f" (last step {_duration(status['last_step_age_s'])} ago)"
    return f"{status['name']} [{status['state']}]: {progress}"


def role_rows(status: dict, error_width: int = 110) -> list[list[str]]:
    rows = []
    for role, r in status["roles"].items():
        if r["pid"] is None:
            state = "no pid"
        elif r["alive"]:
            state = "alive"
        elif r["process"] == "running":
            state = "no heartbeat"  # the process exists but has stopped beating: frozen, or the pid was reused
        elif status["state"] == "finished":
            state = "exited"  # the run is done: its roles are meant to be gone
        else:
            state = f"dead ({r['process']})"
        beat = "-" if r["heartbeat_age_s"] is None else f"{_duration(r['heartbeat_age_s'])} ago"
        rows.append([role, str(r["pid"] if r["pid"] is not None else "-"), state, beat, str(r["restarts"]),
                     _shorten(r["last_error"] or "-", error_width)])
    return rows


def metric_rows(status: dict) -> list[list[str]]:
    return [[name, _number(m["value"]), str(m["step"])] for name, m in status["metrics"].items()]


def checkpoint_line(status: dict) -> str:
    ckpt = status["checkpoint"]
    if not ckpt:
        return "checkpoint: none"
    line = f"checkpoint: step {ckpt.get('step')} at {ckpt.get('path')}"
    return line + (f" (learner incarnation {ckpt['incarnation']})" if "incarnation" in ckpt else "")


def format_status(status: dict) -> str:
    """Plain text, for pipes and logs."""
    lines = [headline(status), ""]
    lines += _columns([["role", "pid", "state", "heartbeat", "restarts", "last error"], *role_rows(status)])
    lines.append("")
    rows = metric_rows(status)
    lines += _columns([["metric", "value", "step"], *rows]) if rows else ["metrics: none yet"]
    lines += ["", checkpoint_line(status)]
    lines += [f"problem: {p}" for p in status["problems"]]
    return "\n".join(lines)


def print_rich(status: dict, console) -> None:
    from rich.table import Table
    from rich.text import Text  # not markup strings: a log line's "[async_llm.py:906]" would read as a style

    colours = {"running": "green", "finished": "cyan", "failed": "red", "stopped": "yellow"}
    console.print(Text(headline(status), style="bold " + colours.get(status["state"], "")))
    roles = Table("role", "pid", "state", "heartbeat", "restarts", "last error", title="roles", title_justify="left")
    for row in role_rows(status, error_width=400):  # rich wraps long errors in the cell
        style = "green" if row[2] == "alive" else "red" if row[2].startswith("dead") else "yellow"
        roles.add_row(*(Text(cell, style=style if i == 2 else "") for i, cell in enumerate(row)))
    console.print(roles)
    rows = metric_rows(status)
    if rows:
        metrics = Table("metric", title="latest metrics", title_justify="left")
        metrics.add_column("value", justify="right")
        metrics.add_column("step", justify="right")
        for row in rows:
            metrics.add_row(*map(Text, row))
        console.print(metrics)
    console.print(checkpoint_line(status), highlight=False)
    for problem in status["problems"]:
        console.print(f"problem: {problem}", style="yellow", highlight=False)


# --------------------------------------------------------------------------- helpers


def _config_facts(run_dir: Path, problems: list[str]) -> tuple[int | None, float]:
    """(learner.steps, supervision.heartbeat_timeout_s). A run started by an older rlpipe may
    hold fields this version refuses: both are then read from the raw JSON, and the load error
    goes to problems."""
    path = run_dir / "config.json"
    if not path.exists():
        return None, SupervisionConfig().heartbeat_timeout_s
    try:
        config = load(path, {"tinker_api_key": ""})  # a run writes its key as "***"
        return config.learner.steps, config.supervision.heartbeat_timeout_s
    except ValueError as err:
        problems.append(str(err))
        raw = _read_json(path, problems) or {}
        learner = raw.get("learner") if isinstance(raw.get("learner"), dict) else {}
        supervision = raw.get("supervision") if isinstance(raw.get("supervision"), dict) else {}
        steps = learner.get("steps", LearnerConfig().steps)
        timeout = supervision.get("heartbeat_timeout_s", SupervisionConfig().heartbeat_timeout_s)
        return (steps if isinstance(steps, int) else None,
                float(timeout) if isinstance(timeout, (int, float)) else SupervisionConfig().heartbeat_timeout_s)


def _process_state(pid: int) -> str:
    """"running", "zombie" (exited, not yet reaped) or "gone", from /proc/<pid>/stat."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return "gone"
    # The command name (in parentheses) may hold spaces: the state is the first field after it.
    return "zombie" if stat.rsplit(")", 1)[1].split()[0] in ("Z", "X") else "running"


def _age_s(path: Path, now: float) -> float | None:
    try:
        return round(now - path.stat().st_mtime, 1)
    except FileNotFoundError:
        return None


def _read_json(path: Path, problems: list[str]) -> dict | None:
    """A JSON object from path, or None when absent. Its owner writes it atomically, so a
    damaged one means something else wrote there: said in problems rather than crash status."""
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        problems.append(f"{path} is not valid JSON: {err}")
        return None
    if not isinstance(data, dict):
        problems.append(f"{path} holds a JSON {type(data).__name__}, not an object")
        return None
    return data


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    if seconds < 172800:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.0f} d"


def _number(value: float) -> str:
    return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.4g}"


def _shorten(text: str, width: int) -> str:
    text = text.replace("\n", " ")
    return text if len(text) <= width else text[: width - 1] + "…"


def _columns(rows: list[list[str]]) -> list[str]:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
