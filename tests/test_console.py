"""Metrics where people look (TensorBoard, W&B, trackio), the console display, and CLI errors
a person can read. The pipeline runs themselves are in test_run_console.py."""

import importlib.util
import json
import math
import os
import socket
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from rlpipe.cli import console
from rlpipe.metrics import MetricsWriter, grouped_name, read_metrics

REPO = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "HF_HUB_OFFLINE": "1"}


def test_metric_names_are_grouped():
    expect = {"loss:sum": "loss/sum", "ratio:mean": "loss/ratio", "ratio:min": "loss/ratio_min",
              "clip_frac:mean": "loss/clip_frac", "entropy:mean": "loss/entropy",
              "kl_sampler_learner:mean": "kl/sampler_learner", "kl_ref:mean": "kl/ref",
              "grad_norm:mean": "optim/grad_norm", "dropped/stale": "buffer/dropped_stale",
              "learner/idle_frac": "time/learner_idle_frac", "explorer/sampler_busy_frac": "time/sampler_busy_frac",
              "explorer/weight_sync_latency_s": "sync/weight_latency_s",
              "reward/mean": "reward/mean", "env/correct": "env/correct", "eval/accuracy": "eval/accuracy", "step": "step"}
    assert {k: grouped_name(k) for k in expect} == expect


def record(step: int) -> dict:
    return {"step": step, "time_end": 1.7e9 + step, "reward/mean": 0.1 * step, "loss:sum": 1.0 / step,
            "kl_sampler_learner:mean": 1e-3, "learner/idle_frac": 0.25, "dropped/stale": 1.0, "env/correct": 0.5,
            "eval/accuracy": math.nan}


def test_metrics_go_to_jsonl_and_tensorboard_with_grouped_names(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    writer = MetricsWriter(tmp_path / "metrics.jsonl")
    for step in range(1, 6):
        writer.write(record(step))
    writer.close()
    records = read_metrics(tmp_path / "metrics.jsonl")
    assert records[0]["loss/sum"] == 1.0 and records[0]["eval/accuracy"] is None and "loss:sum" not in records[0]
    events = EventAccumulator(str(tmp_path / "tensorboard"))  # TensorBoard's own reader
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"reward/mean", "loss/sum", "kl/sampler_learner", "time/learner_idle_frac", "buffer/dropped_stale",
            "env/correct"} <= tags
    assert not tags & {"time_end", "eval/accuracy", "step"}  # the axis, wall clock and NaN are not series
    assert [(e.step, round(e.value, 6)) for e in events.Scalars("reward/mean")] == [(s, round(0.1 * s, 6)) for s in range(1, 6)]
    assert events.Scalars("loss/sum")[0].wall_time == pytest.approx(1.7e9 + 1)


def test_an_old_metrics_file_reads_with_grouped_names(tmp_path):
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss:sum": 2.0, "learner/idle_frac": 0.5}) + "\n")
    assert read_metrics(tmp_path / "metrics.jsonl") == [{"step": 1, "loss/sum": 2.0, "time/learner_idle_frac": 0.5}]


@pytest.mark.skipif(importlib.util.find_spec("wandb") is None or importlib.util.find_spec("trackio") is None,
                    reason="wandb and trackio are optional (pip install rlpipe[trackers])")
@pytest.mark.slow
def test_wandb_and_trackio_get_the_metrics_when_configured(tmp_path):
    # A real wandb (offline mode: no account, no network) and a real trackio (local database),
    # in a child process so their global state stays out of the test session.
    script = textwrap.dedent(f"""
        from rlpipe.metrics import MetricsWriter
        from rlpipe.pipeline.config import LoggingConfig
        w = MetricsWriter({str(tmp_path / "run" / "metrics.jsonl")!r}, run_name="r1", run_config={{"seed": 7}},
                          logging=LoggingConfig(wandb_project="proj", trackio_project="tproj"))
        assert sorted(w._trackers) == ["tensorboard", "trackio", "wandb"], w._trackers
        for step in range(1, 4):
            w.write({{"step": step, "reward/mean": 0.25 * step, "loss:sum": 1.5}})
        w.close()
    """)
    env = {**ENV, "WANDB_MODE": "offline", "WANDB_SILENT": "true", "TRACKIO_DIR": str(tmp_path / "trackio")}
    done = subprocess.run([sys.executable, "-c", script], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    wandb_files = list((tmp_path / "run" / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(wandb_files) == 1 and b"reward/mean" in wandb_files[0].read_bytes()
    db = sqlite3.connect(tmp_path / "trackio" / "tproj.db")
    rows = db.execute("SELECT step, metrics FROM metrics ORDER BY step").fetchall()
    assert [(step, json.loads(m)["reward/mean"]) for step, m in rows] == [(1, 0.25), (2, 0.5), (3, 0.75)]
    assert json.loads(rows[0][1])["loss/sum"] == 1.5


def test_a_tracker_that_fails_is_dropped_not_the_run(tmp_path, caplog):
    writer = MetricsWriter(tmp_path / "metrics.jsonl", tensorboard=False)

    class Broken:
        def log(self, scalars, step):
            raise ConnectionError("tracker down")

        def close(self):
            pass

    writer._trackers["broken"] = Broken()
    writer.write(record(1))
    writer.write(record(2))
    writer.close()
    assert len(read_metrics(tmp_path / "metrics.jsonl")) == 2
    assert "broken failed and is off" in caplog.text


def test_plain_console_prints_every_n_steps_and_the_last(capsys):
    with console.RunDisplay("r", steps=5, every=2) as display:
        for step in range(1, 6):
            display.update(read_like(record(step)))
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[1] for line in lines] == ["2/5", "4/5", "5/5"]
    assert "reward 0.500" in lines[-1] and "learner idle 25%" in lines[-1] and "drops 1" in lines[-1]


def test_quiet_console_prints_nothing(capsys):
    with console.RunDisplay("r", steps=3, quiet=True) as display:
        for step in range(1, 4):
            display.update(read_like(record(step)))
    assert capsys.readouterr().out == ""


def read_like(rec: dict) -> dict:
    return {grouped_name(k): v for k, v in rec.items()}


def test_live_display_on_a_terminal():
    import threading

    master, slave = os.openpty()
    chunks: list[bytes] = []

    def read():  # concurrently, so a full pty buffer never blocks the display
        while True:
            try:
                chunk = os.read(master, 65536)
            except OSError:
                return
            if not chunk:
                return
            chunks.append(chunk)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    terminal = open(slave, "w", buffering=1)
    console._terminal["out"] = terminal
    try:
        assert console.is_terminal(console.out())
        with console.RunDisplay("live-run", steps=4) as display:
            assert display.live is not None
            for step in range(1, 5):
                display.update(read_like(record(step)))
            display.note("role explorer died (test): restart 1/10 in 1 s")
    finally:
        console._terminal.pop("out")
        terminal.close()
    reader.join(timeout=10)
    os.close(master)
    text = b"".join(chunks).decode(errors="replace")
    assert "live-run" in text and "4/4" in text and "reward" in text and "role explorer died" in text


def test_engine_output_goes_to_the_log_and_the_person_sees_say(tmp_path):
    script = textwrap.dedent(f"""
        import logging, os, sys
        from rlpipe.cli import console
        logging.basicConfig()
        print("before")
        with console.engine_output_to({str(tmp_path / "launcher.log")!r}):
            print("WARNING vllm noise")
            logging.getLogger("vllm").warning("Triton is not installed")
            os.system("echo child process noise; echo child err >&2")
            console.say("for the person")
            console.warn("an error line")
        print("after")
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["before", "for the person", "after"]
    assert done.stderr.splitlines() == ["an error line"]
    log = (tmp_path / "launcher.log").read_text()
    for noise in ("WARNING vllm noise", "Triton is not installed", "child process noise", "child err"):
        assert noise in log


def rlpipe_cli(*args, cwd=REPO, timeout=120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "rlpipe.cli", *map(str, args)], cwd=cwd, env=ENV,
                          capture_output=True, text=True, timeout=timeout)


def test_a_config_typo_is_one_clear_line(tmp_path):
    (tmp_path / "typo.toml").write_text('name = "t"\nstesp = 3\n[learner]\nsteps = 2\n')
    done = rlpipe_cli("run", tmp_path / "typo.toml")
    assert done.returncode != 0
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in done.stderr and done.stdout == ""
    assert "stesp" in lines[0] and "steps under [learner]" in lines[0], lines  # the key, and the way out


def test_a_taken_port_is_one_clear_line(tmp_path):
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    port = holder.getsockname()[1]
    try:
        (tmp_path / "c.toml").write_text(f'name = "p"\nruns_dir = "{tmp_path}"\n[addresses]\n'
                                         f'experience = "tcp://127.0.0.1:{port}"\n')
        done = rlpipe_cli("run", tmp_path / "c.toml")
    finally:
        holder.close()
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and f"tcp://127.0.0.1:{port}" in lines[0] and "already in use" in lines[0], done.stderr
    assert "leave [addresses] unset" in lines[0] and "Traceback" not in done.stderr


@pytest.mark.slow
def test_cli_errors_are_one_line_and_debug_shows_the_traceback(tmp_path):
    (tmp_path / "restarts.json").write_text("{not json")  # a damaged run directory
    done = rlpipe_cli("stats", tmp_path)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 1 and len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
    assert lines[0].startswith("rlpipe stats: JSONDecodeError") and "--debug" in lines[0]
    debug = rlpipe_cli("stats", tmp_path, "--debug")
    assert debug.returncode == 1 and "Traceback (most recent call last)" in debug.stderr


def test_roles_get_default_addresses_and_connect_keeps_configured_ports(tmp_path):
    import argparse

    from rlpipe.cli.main import _config

    (tmp_path / "plain.toml").write_text('name = "a"\n')
    (tmp_path / "ports.toml").write_text('name = "b"\n[addresses]\nexperience = "tcp://127.0.0.1:7101"\n'
                                         'batches = "tcp://127.0.0.1:7102"\ncontrol = "tcp://127.0.0.1:7103"\n')
    role = lambda path, command="buffer", **kw: argparse.Namespace(  # noqa: E731
        config=str(tmp_path / path), set=[], command=command, **kw)
    alone = _config(role("plain.toml")).addresses  # a role started alone, no addresses configured
    assert (alone.experience, alone.batches, alone.control) == ("tcp://127.0.0.1:5601", "tcp://127.0.0.1:5602",
                                                                 "tcp://127.0.0.1:5603")
    # An explorer connects to the buffer's experience and the learner's control addresses.
    remote = _config(role("ports.toml", "explorer", connect="10.0.0.5")).addresses
    assert (remote.experience, remote.batches, remote.control) == ("tcp://10.0.0.5:7101", "tcp://127.0.0.1:7102",
                                                                   "tcp://10.0.0.5:7103")


def test_a_role_that_cannot_bind_is_unrecoverable_with_the_address(tmp_path):
    from rlpipe.pipeline import transport
    from rlpipe.pipeline.errors import Unrecoverable

    address = f"tcp://127.0.0.1:{transport.free_port()}"
    first = transport.RequestServer(address)
    try:
        with pytest.raises(Unrecoverable, match=f"cannot bind {address}: the address is already in use"):
            transport.RequestServer(address)  # restarting the role cannot free it: the run stops with this line
    finally:
        first.close()


def test_python_output_during_the_live_display_stays_in_the_log(tmp_path):
    # rich's Live would by default send sys.stdout/stderr to the panel: a print or a warning
    # in the launcher (an evaluation engine, a library) must go to the log instead.
    script = textwrap.dedent(f"""
        import os, threading, warnings
        from rlpipe.cli import console
        master, slave = os.openpty()
        shown = []
        reader = threading.Thread(target=lambda: shown.append(os.read(master, 1 << 16)), daemon=True)
        with console.engine_output_to({str(tmp_path / "launcher.log")!r}):
            console._terminal["out"] = open(slave, "w", buffering=1)  # the person's terminal
            with console.RunDisplay("r", steps=2) as display:
                assert display.live is not None
                print("python print during the display")
                warnings.warn("a library warning during the display")
                display.update({{"step": 1, "reward/mean": 0.5}})
            data = b""
            os.set_blocking(master, False)
            while True:
                try:
                    chunk = os.read(master, 1 << 16)
                except BlockingIOError:
                    break
                if not chunk:
                    break
                data += chunk
        text = data.decode(errors="replace")
        assert "1/2" in text, text
        assert "python print" not in text and "library warning" not in text, text
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    log = (tmp_path / "launcher.log").read_text()
    assert "python print during the display" in log and "a library warning during the display" in log


def test_quiet_still_shows_what_went_wrong(capsys):
    with console.RunDisplay("r", steps=3, quiet=True) as display:
        display.update(read_like(record(1)))
        display.note("role learner failed: RuntimeError: boom; stopping all roles")
    captured = capsys.readouterr()
    assert captured.out == "" and "role learner failed: RuntimeError: boom" in captured.err


def test_a_resumed_writer_replaces_the_later_steps_in_tensorboard(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    first = MetricsWriter(tmp_path / "metrics.jsonl")
    for step in range(1, 8):  # the learner died after step 7; its checkpoint is at step 5
        first.write({"step": step, "reward/mean": float(step)})
    first.close()
    resumed = MetricsWriter(tmp_path / "metrics.jsonl", resume_step=5)
    for step in range(6, 9):
        resumed.write({"step": step, "reward/mean": 100.0 + step})
    resumed.close()
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("reward/mean")] == [
        (1, 1.0), (2, 2.0), (3, 3.0), (4, 4.0), (5, 5.0), (6, 106.0), (7, 107.0), (8, 108.0)]
