"""The torchrun learner (rlpipe/pipeline/distributed.py) against one process, in float64 on the
CPU (gloo): 2 ranks take the 1-process steps (adapter within 1e-5, the same gradient norms and
losses), and a checkpoint resumes with another number of processes, continuing as an
uninterrupted 1-process run does. The 2-rank runs go through torchrun itself; the reference is
the plain 1-process code path (tests/distributed_worker.py), never another distributed run."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest
import torch

from rlpipe.pipeline.distributed import local_torchrun
from tests.distributed_worker import run

pytestmark = pytest.mark.slow  # processes, engines or servers: not in the quick tier (pytest -m "not slow")

ROOT = Path(__file__).resolve().parents[1]
STEPS = 4
SAVE_AT = 2


def torchrun(out: Path, start: int, steps: int, load: str = "", save_at: int = 0, processes: int = 2,
             strategy: str = "ddp") -> list[dict]:
    """tests.distributed_worker as `processes` ranks under torchrun, launched as the learner
    launches its ranks (local_torchrun); rank 0's records. Every socket the run listens on is
    on loopback. A run that hangs is stopped (torchrun stops its ranks; they also die with
    it: die_with_agent)."""
    args = ["-m", "tests.distributed_worker", str(out), str(start), str(steps), load, str(save_at), strategy]
    with local_torchrun(processes, args) as (cmd, env):
        env = {**env, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                start_new_session=True, text=True)
        listening = set()
        deadline = time.monotonic() + 240
        while proc.poll() is None and time.monotonic() < deadline:
            listening |= listening_addresses(descendants(proc.pid))
            time.sleep(0.2)
        try:
            output, _ = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.terminate()
            try:
                output, _ = proc.communicate(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                output, _ = proc.communicate()
            pytest.fail(f"torchrun did not finish within 240 s:\n{output[-3000:]}")
    assert proc.returncode == 0, output[-3000:]
    assert listening, "no listening socket seen: the check below would be empty"  # gloo's, at least
    assert all(host in ("127.0.0.1", "::1") for host, _ in listening), listening
    return json.loads((out / "steps.json").read_text())


def descendants(pid: int) -> set[int]:
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parents[int(stat.parent.name)] = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue  # gone meanwhile
    found, grew = {pid}, True
    while grew:
        more = {p for p, parent in parents.items() if parent in found} - found
        found |= more
        grew = bool(more)
    return found


def listening_addresses(pids: set[int]) -> set[tuple[str, int]]:
    """(host, port) of the TCP sockets these processes listen on (Linux /proc)."""
    inodes = set()
    for pid in pids:
        try:
            for fd in Path(f"/proc/{pid}/fd").iterdir():
                with contextlib.suppress(OSError):
                    target = os.readlink(fd)
                    if target.startswith("socket:["):
                        inodes.add(target[8:-1])
        except OSError:
            continue
    out = set()
    for table, ipv6 in (("/proc/net/tcp", False), ("/proc/net/tcp6", True)):
        with contextlib.suppress(OSError):
            for line in Path(table).read_text().splitlines()[1:]:
                fields = line.split()
                if fields[3] == "0A" and fields[9] in inodes:  # LISTEN
                    address, port = fields[1].split(":")
                    raw = bytes.fromhex(address)
                    if ipv6:  # four little-endian 32-bit words
                        raw = b"".join(raw[i:i + 4][::-1] for i in range(0, 16, 4))
                        host = socket.inet_ntop(socket.AF_INET6, raw)
                        host = host.removeprefix("::ffff:")
                    else:
                        host = socket.inet_ntop(socket.AF_INET, raw[::-1])
                    out.add((host, int(port, 16)))
    return out


def assert_same_steps(got: list[dict], want: list[dict]) -> None:
    assert [r["step"] for r in got] == [r["step"] for r in want]
    for g, w in zip(got, want):
        assert g["optim_steps"] == w["optim_steps"]
        # The gradient norm is before clipping: it shows the summed gradient has the 1-process
        # scale (Adam's update alone would not: it is blind to a constant factor).
        assert g["grad_norm"] == pytest.approx(w["grad_norm"], rel=1e-9), g["step"]
        assert g["loss"] == pytest.approx(w["loss"], rel=1e-9, abs=1e-12), g["step"]
        got_state, want_state = torch.load(g["adapter"]), torch.load(w["adapter"])
        assert got_state.keys() == want_state.keys()
        worst = max((got_state[k] - want_state[k]).abs().max().item() for k in want_state)
        assert worst < 1e-5, f"step {g['step']}: adapter differs from the 1-process one by {worst}"
        assert all(v.dtype == torch.float64 for v in got_state.values())
    # The adapter moved: an all-zero update would match trivially.
    first, last = torch.load(want[0]["adapter"]), torch.load(want[-1]["adapter"])
    assert max((first[k] - last[k]).abs().max().item() for k in first) > 1e-3


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted 1-process run (no torchrun), with a checkpoint after step SAVE_AT."""
    out = tmp_path_factory.mktemp("one-process")
    return out, run(out, 0, STEPS, save_at=SAVE_AT)


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("two-ranks")
    return out, torchrun(out, 0, STEPS, save_at=SAVE_AT)


def checkpoint(out: Path) -> str:
    return str(out / "ckpt" / "state" / f"step-{SAVE_AT:06d}")


def test_two_processes_take_the_one_process_steps(reference, two_ranks):
    assert_same_steps(two_ranks[1], reference[1])


def test_fsdp_shards_the_base_and_takes_the_one_process_steps(reference, tmp_path):
    """learner.strategy = "fsdp": rank 0 holds half of the layers' base weights, and the steps
    are still the 1-process steps. Micro-batches of 48 tokens give the ranks different numbers
    of passes (and one of them no share of the 1-datum mini-batch): the idle passes that keep
    FSDP's gathers in step must leave the gradients alone."""
    got = torchrun(tmp_path / "fsdp", 0, STEPS, strategy="fsdp")
    assert_same_steps(got, reference[1])
    assert all(r["held"] == pytest.approx(0.5, abs=0.01) for r in got), [r["held"] for r in got]
    assert all(r["held"] == 1.0 for r in reference[1])


def test_resume_with_a_different_number_of_processes(reference, two_ranks, tmp_path):
    want = reference[1][SAVE_AT:]
    # Written by 2 ranks, resumed by 1 process.
    assert_same_steps(run(tmp_path / "2-to-1", SAVE_AT, STEPS - SAVE_AT, load=checkpoint(two_ranks[0])), want)
    # Written by 1 process, resumed by 2 ranks (rank 0 loads it and hands it to rank 1), here
    # with the base sharded: the checkpoint is the same adapter and optimizer state either way.
    resumed = torchrun(tmp_path / "1-to-2", SAVE_AT, STEPS - SAVE_AT, load=checkpoint(reference[0]), strategy="fsdp")
    assert_same_steps(resumed, want)


def test_rlpipe_run_with_two_learner_processes(tmp_path):
    """learner.processes = 2 (with the base sharded: strategy "fsdp") through `rlpipe run`: the
    learner role runs itself under torchrun, rank 0 publishes, checkpoints and writes metrics,
    and nothing is left running at the end (torchrun's ranks are in sessions of their own, so
    look for them by their command line)."""
    from rlpipe.metrics import read_metrics
    from tests.test_pipeline import run_to_end, write_config

    config = write_config(tmp_path, "ddp", sampler="local", steps=2, checkpoint_every=1,
                          learner_lines=["processes = 2", 'strategy = "fsdp"'])
    run_to_end(config, timeout_s=300)
    run_dir = tmp_path / "ddp"
    records = read_metrics(run_dir / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2]
    assert all(r["learner/processes"] == 2 for r in records)
    assert json.loads((run_dir / "learner" / "latest.json").read_text())["step"] == 2
    log = (run_dir / "logs" / "learner.log").read_text()
    for rank in (0, 1):
        assert f"learner rank {rank}: FSDP over 2 ranks, holding 50.0% of the decoder layers' base weights" in log
    left = [p for p in Path("/proc").glob("[0-9]*/cmdline") if str(config) in _read(p)]
    assert not left, f"processes of the run left behind: {left}"


def _read(path: Path) -> str:
    try:
        return path.read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""  # gone while we looked
