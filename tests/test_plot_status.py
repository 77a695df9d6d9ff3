"""`rlpipe plot` and `rlpipe status` on run directories made here: a plausible 100-step run,
partial and old-style metric files, and live, dead and zombie role processes."""

import argparse
import json
import math
import os
import random
import subprocess
import time
from pathlib import Path

import pytest

from rlpipe.pipeline.config import LearnerConfig, RunConfig, SupervisionConfig, dump
from rlpipe.cli.plot import plot_run, read_records, rolling_mean, series
from rlpipe.cli.status import main as status_main
from rlpipe.cli.status import run_status

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def plausible_record(step: int, rng: random.Random, start: float) -> dict:
    """One learner step as the pipeline logs it now, with values that move like a run that learns."""
    progress = step / 100
    correct = min(1.0, 0.15 + 0.5 * progress + rng.gauss(0, 0.05))
    k1 = rng.randint(0, 32)
    record = {
        "step": step, "time": start + 0.5 * step, "time_end": start + 0.5 * step + 0.4,
        "reward/mean": correct + 0.1 + rng.gauss(0, 0.03), "reward/std": 0.4, "env/correct": correct,
        "loss/sum": rng.gauss(0, 0.003), "loss/ratio": 1 + rng.gauss(0, 0.01),
        "loss/ratio_min": 0.6 + rng.random() * 0.3, "loss/ratio_max": 1.1 + rng.random() * 0.8,
        "loss/clip_frac": rng.random() * 0.02, "loss/entropy": 1.2 - 0.6 * progress + rng.gauss(0, 0.02),
        "kl/sampler_learner": 10 ** rng.uniform(-4, -2.5), "kl/k1": rng.gauss(0, 1e-3),
        "kl/ref": 0.002 * step + 1e-4, "optim/grad_norm": 0.3 + rng.random() * 0.3,
        "optim/lr": 1e-4 * min(1.0, step / 10) * (1 - 0.5 * progress),
        "staleness/0": 128 - k1, "staleness/1": k1, "staleness/max": 1 if k1 else 0,
        "tokens/sampled": 1000, "tokens/trained": 2300,
        "tokens/sampled_per_s": 4000 + rng.gauss(0, 500), "tokens/trained_per_s": 15000 + rng.gauss(0, 2000),
        "time/step_s": 0.4, "time/train_s": 0.2, "time/wait_batch_s": 0.1,
        "time/learner_idle_frac": min(1.0, abs(rng.gauss(0.3, 0.2))),
        "time/sampler_busy_frac": 0.85 + rng.gauss(0, 0.02),
        "sync/publish_s": 0.003, "sync/weight_latency_s": 0.01, "buffer/dropped_no_signal": step * 3,
    }
    if step % 10 == 0:
        record |= {"eval/accuracy": 0.1 + 0.5 * progress, "eval/nll": 2.0 - progress}
    if step % 10 == 5:
        record["staleness/2"] = 4  # a rare k=2 group: a third band in the staleness panel
    return record


def write_metrics(run_dir: Path, records: list[dict]) -> Path:
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / "metrics.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def assert_png(path: Path, min_bytes: int = 10_000) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE, f"{path} is not a PNG"
    assert len(data) > min_bytes, f"{path} is only {len(data)} bytes"


# --------------------------------------------------------------------------- plot


def test_plot_of_a_100_step_run(tmp_path):
    rng = random.Random(0)
    run_dir = tmp_path / "arith-async"
    write_metrics(run_dir, [plausible_record(s, rng, 1.8e9) for s in range(1, 101)])
    start = time.monotonic()
    out = plot_run(run_dir)
    took = time.monotonic() - start
    assert out == run_dir / "curves.png"
    assert_png(out, min_bytes=100_000)  # nine panels of curves, not an empty page
    assert took < 10, f"plot_run took {took:.1f} s"  # the budget is 3 s; a shared test machine gets slack


def test_plot_of_a_partial_file_and_a_missing_step(tmp_path):
    """Only a few keys, a null, a NaN written as text, a record without a step, and a line cut
    short (being written): every panel without data says so, and the page is still drawn."""
    run_dir = tmp_path / "partial"
    path = write_metrics(run_dir, [{"step": 1, "reward/mean": 0.1}, {"step": 2, "reward/mean": None},
                                   {"reward/mean": 0.3, "env/correct": "NaN"}, {"step": 4, "eval/accuracy": 0.5}])
    with open(path, "a") as f:
        f.write('{"step": 5, "reward/me')
    out = plot_run(run_dir, tmp_path / "sub" / "partial.png")
    assert out == tmp_path / "sub" / "partial.png"
    assert_png(out)
    records = read_records(run_dir)
    assert len(records) == 4  # the cut line is skipped
    steps, values = series(records, "reward/mean")
    assert steps.tolist() == [1.0, 3.0] and values.tolist() == [0.1, 0.3]  # the step-less record placed by position
    assert series(records, "env/correct")[1].size == 0


def test_plot_of_a_resumed_run_draws_each_step_once(tmp_path):
    """A learner restarted from its step-3 checkpoint logs steps 4 and 5 again: the later
    records count, in step order."""
    run_dir = tmp_path / "resumed"
    first = [{"step": s, "reward/mean": 0.1 * s, "staleness/0": 8} for s in range(1, 6)]
    second = [{"step": s, "reward/mean": 1.0 + s, "staleness/1": 8} for s in range(4, 8)]
    write_metrics(run_dir, first + second)
    steps, values = series(read_records(run_dir), "reward/mean")
    assert steps.tolist() == [1, 2, 3, 4, 5, 6, 7]
    assert values.tolist() == pytest.approx([0.1, 0.2, 0.3, 5.0, 6.0, 7.0, 8.0])
    assert_png(plot_run(run_dir))


def test_plot_reads_old_metric_names(tmp_path):
    rng = random.Random(1)
    old = {"loss/sum": "loss:sum", "loss/ratio_min": "ratio:min", "loss/ratio_max": "ratio:max",
           "loss/ratio": "ratio:mean", "kl/sampler_learner": "kl_sampler_learner:mean",
           "optim/grad_norm": "grad_norm:mean", "time/learner_idle_frac": "learner/idle_frac",
           "time/sampler_busy_frac": "explorer/sampler_busy_frac", "buffer/dropped_no_signal": "dropped/no_signal"}
    records = [{old.get(k, k): v for k, v in plausible_record(s, rng, 1.7e9).items()} for s in range(1, 31)]
    run_dir = tmp_path / "old"
    write_metrics(run_dir, records)
    assert_png(plot_run(run_dir))
    grouped = read_records(run_dir)
    assert series(grouped, "loss/sum")[1].tolist() == [r["loss:sum"] for r in records]
    assert series(grouped, "time/learner_idle_frac")[1].size == 30
    assert series(grouped, "kl/sampler_learner")[1].size == 30


def test_plot_user_errors_are_one_line(tmp_path):
    with pytest.raises(SystemExit, match=r"rlpipe plot: .*nowhere is not a directory"):
        plot_run(tmp_path / "nowhere")
    (tmp_path / "bare").mkdir()
    with pytest.raises(SystemExit, match=r"rlpipe plot: .*metrics.jsonl does not exist"):
        plot_run(tmp_path / "bare")
    write_metrics(tmp_path / "empty", [])
    with pytest.raises(SystemExit, match=r"rlpipe plot: .*metrics.jsonl holds no metric records"):
        plot_run(tmp_path / "empty")
    write_metrics(tmp_path / "one", [{"step": 1, "reward/mean": 0.5}])
    with pytest.raises(SystemExit, match=r"rlpipe plot: cannot write .*curves.txt: the name must end in one of .*png"):
        plot_run(tmp_path / "one", tmp_path / "curves.txt")


def test_plot_main_prints_the_file(tmp_path, capsys):
    from rlpipe.cli.plot import main

    write_metrics(tmp_path / "one", [{"step": 1, "reward/mean": 0.5}])
    main(argparse.Namespace(run_dir=str(tmp_path / "one"), out=str(tmp_path / "x.png")))
    assert capsys.readouterr().out.strip() == str(tmp_path / "x.png")
    assert_png(tmp_path / "x.png")


def test_rolling_mean_is_trailing():
    import numpy as np

    assert rolling_mean(np.array([1.0, 2.0, 3.0, 4.0]), 2).tolist() == [1.0, 1.5, 2.5, 3.5]
    assert rolling_mean(np.array([5.0]), 10).tolist() == [5.0]


# --------------------------------------------------------------------------- status


def exited_pid(zombie: bool) -> tuple[int, subprocess.Popen]:
    """The pid of a process that has exited: reaped (gone), or not yet (a zombie)."""
    proc = subprocess.Popen(["true"])
    if not zombie:
        proc.wait()
        return proc.pid, proc
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        stat = Path(f"/proc/{proc.pid}/stat").read_text()
        if stat.rsplit(")", 1)[1].split()[0] == "Z":
            return proc.pid, proc
        time.sleep(0.01)
    raise AssertionError("the child never became a zombie")


@pytest.fixture
def run_dir(tmp_path):
    """A run directory as a launcher leaves it mid-run: buffer alive (this process), learner
    dead with a traceback in its log, explorer a zombie that left an explorer.failed."""
    run_dir = tmp_path / "live"
    logs = run_dir / "logs"
    logs.mkdir(parents=True)
    dead, dead_proc = exited_pid(zombie=False)
    zombie, zombie_proc = exited_pid(zombie=True)
    (run_dir / "pids.json").write_text(json.dumps({"buffer": os.getpid(), "learner": dead, "explorer": zombie}))
    (run_dir / "config.json").write_bytes(dump(RunConfig(learner=LearnerConfig(steps=40),
                                                         supervision=SupervisionConfig(heartbeat_timeout_s=30.0))))
    for role in ("buffer", "learner", "explorer"):
        (logs / f"{role}.heartbeat").touch()
    old = time.time() - 600
    os.utime(logs / "learner.heartbeat", (old, old))
    (logs / "explorer.failed").write_text("EngineDeadError: explorer-0: the sampling engine died\n")
    (logs / "learner.log").write_text(
        "2026-12-01 03:16:14,121 rlpipe INFO step 9\n"
        "2026-12-01 03:16:14,200 rlpipe ERROR learner: could not reach the buffer, retrying\n"
        "Traceback (most recent call last):\n"
        '  File "/work/main/rlpipe/pipeline/learner.py", line 12, in run\n'
        "    raise ValueError('batch 7 holds no tokens')\n"
        "ValueError: batch 7 holds no tokens\n")
    (logs / "buffer.log").write_text("2026-12-01 03:16:14,121 rlpipe INFO ready\n")
    (run_dir / "restarts.json").write_text(json.dumps({"learner": 2}))
    (run_dir / "learner").mkdir()
    latest = {"path": str(run_dir / "learner/state/step-000008"), "step": 8, "after_seq": 64,
              "groups_trained": 64, "incarnation": 3}
    (run_dir / "learner" / "latest.json").write_text(json.dumps(latest))
    rng = random.Random(2)
    write_metrics(run_dir, [plausible_record(s, rng, time.time() - 20) for s in range(1, 13)])
    yield run_dir
    zombie_proc.wait()
    dead_proc.wait()


def test_status_json_reports_the_facts(run_dir, capsys):
    status_main(argparse.Namespace(run_dir=str(run_dir), json=True))
    status = json.loads(capsys.readouterr().out)
    assert status["name"] == "live"
    assert status["state"] == "running"  # the buffer is alive
    assert (status["step"], status["steps"]) == (12, 40)
    assert status["heartbeat_timeout_s"] == 30.0
    roles = status["roles"]
    assert list(roles) == ["buffer", "learner", "explorer"]
    assert roles["buffer"] | {"heartbeat_age_s": None} == {
        "pid": os.getpid(), "process": "running", "heartbeat_age_s": None, "alive": True, "restarts": 0,
        "last_error": None, "error_source": None}
    assert roles["buffer"]["heartbeat_age_s"] < 30
    assert roles["learner"]["process"] == "gone" and roles["learner"]["alive"] is False
    assert roles["learner"]["heartbeat_age_s"] >= 599
    assert roles["learner"]["restarts"] == 2
    # The exception that ends the traceback is later than the ERROR line: it is the last error.
    assert roles["learner"]["last_error"] == "ValueError: batch 7 holds no tokens"
    assert roles["learner"]["error_source"] == "logs/learner.log"
    assert roles["explorer"]["process"] == "zombie" and roles["explorer"]["alive"] is False
    assert roles["explorer"]["last_error"] == "EngineDeadError: explorer-0: the sampling engine died"
    assert roles["explorer"]["error_source"] == "logs/explorer.failed"
    assert status["checkpoint"] == json.loads((run_dir / "learner" / "latest.json").read_text())
    assert status["restarts"] == {"learner": 2}
    metrics = status["metrics"]
    assert metrics["eval/accuracy"]["step"] == 10  # eval every 10 steps: from an earlier record
    assert metrics["reward/mean"]["step"] == 12
    assert metrics["kl/ref"]["value"] == pytest.approx(0.002 * 12 + 1e-4)
    assert set(metrics) >= {"loss/sum", "kl/sampler_learner", "tokens/sampled_per_s", "tokens/trained_per_s"}
    assert status["problems"] == []


def test_status_text_and_stale_heartbeat(run_dir, capsys):
    old = time.time() - 600
    os.utime(run_dir / "logs" / "buffer.heartbeat", (old, old))  # alive process, silent for 10 min: frozen
    status = run_status(run_dir)
    assert status["roles"]["buffer"]["process"] == "running" and status["roles"]["buffer"]["alive"] is False
    assert status["state"] == "failed"  # no role alive, explorer.failed present
    status_main(argparse.Namespace(run_dir=str(run_dir), json=False))
    text = capsys.readouterr().out  # not a terminal here: plain text
    assert text.startswith("live [failed]: step 12/40")
    assert "no heartbeat" in text and "dead (zombie)" in text and "dead (gone)" in text
    assert "ValueError: batch 7 holds no tokens" in text
    assert "checkpoint: step 8 at" in text and "(learner incarnation 3)" in text
    assert "\x1b[" not in text  # no terminal colour codes in a pipe


def test_status_of_an_old_run_and_user_errors(tmp_path):
    with pytest.raises(SystemExit, match=r"^rlpipe status: .*nowhere is not a directory$"):
        run_status(tmp_path / "nowhere")
    run_dir = tmp_path / "old"
    run_dir.mkdir()
    config = json.loads(dump(RunConfig(learner=LearnerConfig(steps=7))))
    config["explorer"]["push_timeout_s"] = 5  # a field an older rlpipe wrote
    (run_dir / "config.json").write_text(json.dumps(config))
    (run_dir / "pids.json").write_text("{not json")
    write_metrics(run_dir, [{"step": 7, "loss:sum": 0.5, "kl_sampler_learner:mean": 0.01}])
    status = run_status(run_dir)
    assert status["steps"] == 7 and status["step"] == 7
    assert status["state"] == "finished"
    assert status["metrics"]["loss/sum"] == {"value": 0.5, "step": 7}  # old names mapped
    assert status["metrics"]["kl/sampler_learner"]["value"] == 0.01
    assert any("push_timeout_s" in p for p in status["problems"])
    assert any("pids.json is not valid JSON" in p for p in status["problems"])
    assert all(r["pid"] is None and r["alive"] is False for r in status["roles"].values())
    assert status["checkpoint"] is None and status["last_step_age_s"] is None
    assert not math.isnan(status["heartbeat_timeout_s"])
