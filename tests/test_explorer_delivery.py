"""The explorer's side of a long-running service: the outbox (at-least-once delivery, counters,
restart), back-pressure, following a restarted learner, the dataset position, and a vLLM
engine that dies under the explorer and is restarted in place.

The buffer and the learner are stand-ins here, in this process: a ROUTER that records each
TrajectoryGroup and answers GroupAck (it stands in for rlpipe/pipeline/buffer.py, which is
being rewritten to this protocol in parallel) and the learner's real ControlServer, fed
WeightUpdates by the test. The explorer, its outbox, its sampler and its sockets are real."""

from __future__ import annotations

import asyncio
import os
import queue
import signal
import threading
import time
from pathlib import Path

import msgspec
import pytest
import zmq

from rlpipe.env import StepResult
from rlpipe.pipeline import identity, transport
from rlpipe.pipeline.config import RunConfig
from rlpipe.pipeline.errors import Unrecoverable
from rlpipe.pipeline.explorer import Explorer
from rlpipe.pipeline.explorer_engine import ExplorerEngine
from rlpipe.pipeline.outbox import Outbox, OutboxSender, read_outbox_stats, unacked_ids
from rlpipe.types import CreditGrant, CreditRequest, GroupAck, ModelInput, SamplingParams, Trajectory, TrajectoryGroup, WeightUpdate
from tests.test_fail_fast import engine_processes

# --------------------------------------------------------------------------- a dataset that says where it is


class CountingEnv:
    """The prompt names the builder's dataset position: [3, 20 + batch, 20 + index, 4]."""

    def __init__(self, batch: int, index: int):
        self.tokens = [3, 20 + batch % 200, 20 + index, 4]

    async def initial_observation(self):
        return ModelInput.from_ints(self.tokens), [1]

    async def step(self, action):
        return StepResult(reward=float(sum(action) % 7), episode_done=True)


class CountingBuilder:
    def __init__(self, batch: int, index: int, group_size: int):
        self.batch, self.index, self.group_size = batch, index, group_size

    async def make_envs(self):
        return [CountingEnv(self.batch, self.index) for _ in range(self.group_size)]


class CountingDataset:
    def __init__(self, tokenizer, groups_per_batch: int = 2, group_size: int = 4):
        self.groups_per_batch, self.group_size = groups_per_batch, group_size

    def __len__(self) -> int:
        return 1_000_000

    def get_batch(self, index: int):
        return [CountingBuilder(index, i, self.group_size) for i in range(self.groups_per_batch)]


def position(group: TrajectoryGroup) -> tuple[int, int]:
    """(batch, index in batch) of the builder a group came from (see CountingEnv)."""
    tokens = group.trajectories[0].tokens
    return tokens[1] - 20, tokens[2] - 20


# --------------------------------------------------------------------------- stand-ins


class StandInBuffer:
    """Stands in for the buffer: records every TrajectoryGroup it receives and, while `acking`
    is set, answers GroupAck: "accepted" for a group id it has not seen, else "duplicate".
    Every credit an explorer asks for is granted (no admission budget here: only max_unacked
    bounds the explorer; the budget is tested in tests/test_admission.py).

    Its socket has a ZeroMQ context of its own, terminated by stop(): zmq_close() lets go of
    the port later, on the context's I/O thread, so a stand-in started at once on the same
    address could fail to bind (1 in 5 times here); zmq_ctx_term() returns after that."""

    def __init__(self, address: str):
        self.address = address
        self.frames: list[TrajectoryGroup] = []  # every group received, re-sends included
        self.first: dict[str, TrajectoryGroup] = {}  # group id -> the group, in first-receipt order
        self.acking = threading.Event()
        self.acking.set()
        self._stop = threading.Event()
        self._bound = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        assert self._bound.wait(10)

    def _run(self) -> None:
        ctx = zmq.Context()
        server = transport.RequestServer(self.address, max_message_bytes=transport.EXPERIENCE_MAX_BYTES, ctx=ctx)
        self._bound.set()
        try:
            while not self._stop.is_set():
                got = server.recv(0.05)
                if got is None:
                    continue
                to, msg = got
                if isinstance(msg, CreditRequest):
                    server.reply(to, CreditGrant(start_until=msg.started + msg.want, lease_s=60.0))
                    continue
                assert isinstance(msg, TrajectoryGroup)
                self.frames.append(msg)
                outcome = "duplicate" if msg.group_id in self.first else "accepted"
                self.first.setdefault(msg.group_id, msg)
                if self.acking.is_set():
                    server.reply(to, GroupAck(group_id=msg.group_id, outcome=outcome))
        finally:
            server.close(linger_ms=0)
            ctx.term()  # the port is free when this returns

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)


class StandInLearner:
    """The learner's control socket (a real ControlServer), polled by a thread; the test
    publishes WeightUpdates and Shutdown through it. A context of its own, as StandInBuffer's."""

    def __init__(self, address: str):
        self.address = address
        self._commands: queue.Queue = queue.Queue()
        self._stop = threading.Event()
        self._bound = threading.Event()
        self.peers: dict = {}
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        assert self._bound.wait(10)  # a learner that could not bind fails the test here, not as a silent timeout

    def publish(self, update: WeightUpdate) -> None:
        self._commands.put(("publish", update))

    def shutdown(self) -> None:
        self._commands.put(("shutdown", "the test is done"))

    def _run(self) -> None:
        ctx = zmq.Context()
        server = transport.ControlServer(self.address, ctx=ctx)
        self._bound.set()
        try:
            while not self._stop.is_set():
                while not self._commands.empty():
                    what, arg = self._commands.get()
                    server.publish(arg) if what == "publish" else server.shutdown(arg)
                server.poll(0.05)
                self.peers = {p.name: p.version for p in server.peers.values()}
        finally:
            server.close(linger_ms=0)
            ctx.term()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)


def weight_update(adapter_dir: str, version: int, incarnation: int, run_id: str) -> WeightUpdate:
    files = Path(adapter_dir)
    return WeightUpdate(version=version, adapter_config=(files / "adapter_config.json").read_bytes(),
                        adapter_weights=(files / "adapter_model.safetensors").read_bytes(),
                        run_id=run_id, incarnation=incarnation, created_at=time.time())


def make_config(tmp_path, max_staleness: int = 100, base_model: str = "", **explorer) -> RunConfig:
    """max_staleness 100: admission never waits for new weights in these tests (only max_unacked does)."""
    ports = [transport.free_port() for _ in range(3)]
    return msgspec.convert({
        "name": "run", "runs_dir": str(tmp_path), "max_staleness": max_staleness, "groups_per_batch": 2, "base_model": base_model,
        "dataset": {"factory": "tests.test_explorer_delivery:CountingDataset", "args": {"group_size": 4}},
        "explorer": {"sampler": "local", "concurrency": 2, "max_tokens": 4, "ack_timeout_s": 0.5,
                     "max_unacked": 4, "episode_timeout_s": 60, **explorer},
        "learner": {"rank": 8},
        "addresses": dict(zip(("experience", "batches", "control"), (f"tcp://127.0.0.1:{p}" for p in ports))),
    }, RunConfig)


class Running:
    """An Explorer's run() on its own thread and event loop, as `rlpipe explorer` runs it."""

    def __init__(self, config: RunConfig, name: str):
        self.explorer = Explorer(config, name)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._main, daemon=True)
        self.thread.start()

    def _main(self) -> None:
        try:
            asyncio.run(self.explorer.run())
        except BaseException as err:  # the test asserts there was none
            self.error = err

    def join(self, timeout_s: float) -> None:
        self.thread.join(timeout_s)
        assert not self.thread.is_alive(), "the explorer did not stop"
        assert self.error is None, repr(self.error)


def wait_until(predicate, timeout_s: float, what: str, running: Running | None = None):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if (value := predicate()):
            return value
        if running is not None and not running.thread.is_alive():
            pytest.fail(f"the explorer stopped while waiting for {what}: {running.error!r}")
        time.sleep(0.05)
    pytest.fail(f"timed out after {timeout_s} s waiting for {what}")


def group(i: int, tokens: int = 4) -> TrajectoryGroup:
    traj = Trajectory(tokens=[3] * tokens, action_mask=[0] + [1] * (tokens - 1), sampling_logprobs=[0.0] + [-1.0] * (tokens - 1),
                      policy_versions=[-1] + [0] * (tokens - 1), reward=float(i))
    return TrajectoryGroup(group_id=f"g{i:04d}", trajectories=[traj, traj], explorer_id="e")


# --------------------------------------------------------------------------- the outbox alone


def test_outbox_counts_survive_reopening_and_read_only_stats(tmp_path):
    box = Outbox(tmp_path, max_message_bytes=4096)
    for i in range(5):
        box.put(group(i))
    box.put(group(5, tokens=2000))  # too large for any buffer: committed as a failed group saying so
    assert box.ack("g0000", "accepted") and box.ack("g0001", "no_signal", sends=3)
    assert not box.ack("g0000", "accepted")  # acknowledged before: not counted twice
    box.count("engine_restarts")
    box.set_state(dataset_batch=7, dataset_offset=1)
    live = read_outbox_stats(tmp_path)  # another reader while the explorer holds the file open
    assert live == box.stats()
    assert live["finished"] == 6 and live["unacked"] == 4 and live["acked"] == {"accepted": 1, "no_signal": 1}
    assert live["resends"] == 2 and live["engine_restarts"] == 1 and live["dataset_batch"] == 7
    box.close()

    again = Outbox(tmp_path)  # a restarted explorer
    assert again.unacked == 4 and again.state("dataset_batch") == 7 and again.state("dataset_offset") == 1
    oldest = again.oldest()
    assert oldest.group_id == "g0002" and oldest.trajectories and oldest == group(2)
    for gid in ("g0002", "g0003", "g0004"):
        again.ack(gid, "accepted")
    big = again.oldest()
    assert big.group_id == "g0005" and big.failed and big.error.startswith("oversize") and not big.trajectories
    assert unacked_ids(tmp_path) == {"g0005"}
    stats = again.stats()
    assert stats["finished"] == sum(stats["acked"].values()) + stats["unacked"]
    again.close()


def test_a_group_that_does_not_encode_fails_alone(tmp_path):
    import numpy as np

    box = Outbox(tmp_path)
    bad = msgspec.structs.replace(group(0), trajectories=[msgspec.structs.replace(
        group(0).trajectories[0], metrics={"score": np.int64(3)})])  # an env returned a numpy scalar
    box.put(bad)
    box.put(group(1))
    first = box.oldest()
    assert first.group_id == "g0000" and first.failed and first.error.startswith("schema: the group does not encode")
    assert box.stats()["finished"] == 2 and box.unacked == 2  # counted, and the explorer goes on
    box.close()


def test_sender_resends_until_acknowledged_and_a_restart_resends_the_outbox(tmp_path):
    address = transport.tcp_address()
    box = Outbox(tmp_path)
    for i in range(3):
        box.put(group(i))
    sender = OutboxSender(box, address, ack_timeout_s=0.3).start()
    time.sleep(1.0)  # no buffer yet: the sender just keeps trying
    assert sender.alive and box.unacked == 3

    buffer = StandInBuffer(address)
    buffer.acking.clear()  # it receives, but its acks are lost
    wait_until(lambda: len(buffer.frames) >= 3, 10, "re-sends of an unacknowledged group")
    assert {g.group_id for g in buffer.frames} == {"g0000"}  # oldest first, one at a time, until acked
    buffer.acking.set()
    wait_until(lambda: box.unacked == 0, 10, "the outbox to drain")
    assert [g for g in buffer.first] == ["g0000", "g0001", "g0002"]
    assert box.stats()["acked"] == {"duplicate": 1, "accepted": 2} and box.stats()["resends"] >= 2

    buffer.stop()  # the buffer goes away: groups wait in the outbox
    for i in range(3, 6):
        box.put(group(i))
    sender.stop()  # ... and so does the explorer (a crash: nothing acknowledged)
    box.close()

    buffer = StandInBuffer(address)  # both come back
    box = Outbox(tmp_path)
    box.put(group(6))
    sender = OutboxSender(box, address, ack_timeout_s=0.3).start()
    wait_until(lambda: box.unacked == 0, 10, "the restarted explorer's outbox to drain")
    assert list(buffer.first) == ["g0003", "g0004", "g0005", "g0006"]  # the old outbox first
    stats = read_outbox_stats(tmp_path)
    assert stats["finished"] == 7 == sum(stats["acked"].values()) and stats["unacked"] == 0
    sender.stop()
    box.close()
    buffer.stop()


# --------------------------------------------------------------------------- the explorer


@pytest.mark.slow
def test_explorer_delivers_through_outages_follows_the_learner_and_resumes(tmp_path, make_lora_adapter):
    config = make_config(tmp_path)
    run_id = identity.run_id(config.run_dir)
    exp, ctrl = config.addresses.experience, config.addresses.control
    buffer, learner = StandInBuffer(exp), StandInLearner(ctrl)
    learner.publish(weight_update(make_lora_adapter(seed=1), version=3, incarnation=1, run_id=run_id))
    running = Running(config, "explorer-0")
    explorer = running.explorer
    outbox_dir = config.run_dir / "explorer-0"

    wait_until(lambda: len(buffer.first) >= 4, 120, "the first groups", running)
    for g in buffer.first.values():
        versions = {v for t in g.trajectories for v, m in zip(t.policy_versions, t.action_mask) if m}
        assert g.run_id == run_id and g.incarnation == 1 and versions == {3} and g.explorer_id == "explorer-0"

    # Back-pressure: a buffer that stops acknowledging holds the outbox at max_unacked. The
    # groups already rolling out still finish (how long they take depends on the machine's load).
    buffer.acking.clear()
    wait_until(lambda: explorer.running == 0 and explorer.outbox.unacked >= config.explorer.max_unacked, 60,
               "the outbox to fill up to max_unacked", running)
    stalled = read_outbox_stats(outbox_dir)
    time.sleep(1.5)
    assert read_outbox_stats(outbox_dir)["finished"] == stalled["finished"]  # no new groups started
    assert 1 <= stalled["unacked"] <= config.explorer.max_unacked
    buffer.acking.set()
    wait_until(lambda: read_outbox_stats(outbox_dir)["finished"] >= stalled["finished"] + 4, 60, "rollouts to resume", running)

    # A buffer that is down (then back, empty-handed) only delays delivery.
    buffer.stop()
    time.sleep(2.0)
    assert running.thread.is_alive()
    buffer = StandInBuffer(exp)
    wait_until(lambda: len(buffer.first) >= 2, 60, "groups after the buffer came back", running)

    # Another run's learner is ignored.
    learner.publish(weight_update(make_lora_adapter(seed=2), version=9, incarnation=1, run_id="another-run"))
    wait_until(lambda: explorer.stats.get("updates_other_run"), 20, "the other run's update", running)
    assert explorer.version == 3 and explorer.incarnation == 1

    # The learner restarts (incarnation 2) from a checkpoint at a LOWER version: taken at once.
    learner.stop()
    learner = StandInLearner(ctrl)
    adapter2 = make_lora_adapter(seed=3)
    learner.publish(weight_update(adapter2, version=1, incarnation=2, run_id=run_id))
    wait_until(lambda: [g for g in buffer.first.values() if g.incarnation == 2], 60, "groups of incarnation 2", running)
    assert explorer.version == 1 and explorer.incarnation == 2 and explorer.first_version == 1
    for g in [g for g in buffer.first.values() if g.incarnation == 2]:
        assert {v for t in g.trajectories for v, m in zip(t.policy_versions, t.action_mask) if m} == {1}

    # Stop while the buffer does not acknowledge: what is left stays in the outbox.
    buffer.acking.clear()
    wait_until(lambda: read_outbox_stats(outbox_dir)["unacked"] >= 2, 30, "unacknowledged groups", running)
    learner.shutdown()
    running.join(60)
    stopped = read_outbox_stats(outbox_dir)
    assert stopped["unacked"] >= 2 and stopped["finished"] == sum(stopped["acked"].values()) + stopped["unacked"]
    assert (outbox_dir / "stats.json").exists()
    leftover = unacked_ids(outbox_dir)
    seen = {position(g) for g in buffer.first.values()} | {position(g) for g in buffer.frames}
    resume_at = (stopped["dataset_batch"], stopped["dataset_offset"])
    assert resume_at > max(seen)  # the position moved past every builder rolled out
    learner.stop()
    buffer.stop()

    # The explorer starts again with the same id: its outbox first, then the dataset from where it was.
    buffer, learner = StandInBuffer(exp), StandInLearner(ctrl)
    learner.publish(weight_update(adapter2, version=1, incarnation=2, run_id=run_id))
    running = Running(config, "explorer-0")
    wait_until(lambda: len(buffer.first) >= len(leftover) + 2, 120, "groups after the restart", running)
    order = list(buffer.first.values())
    assert {g.group_id for g in order[: len(leftover)]} == leftover
    fresh = order[len(leftover):]
    assert min(position(g) for g in fresh) >= resume_at and min(position(g) for g in fresh)[0] > 0
    learner.shutdown()
    running.join(60)
    final = read_outbox_stats(outbox_dir)
    assert final["unacked"] == 0 and final["finished"] == sum(final["acked"].values())
    learner.stop()
    buffer.stop()


async def test_an_adapter_the_engine_cannot_load_is_unrecoverable(tmp_path, tiny_model_path, make_lora_adapter):
    sampler = ExplorerEngine(tiny_model_path, "local", {"max_loaded_adapters": 2}, name="explorer-t",
                             adapter_dir=tmp_path, start_timeout_s=60, load_timeout_s=60, request_timeout_s=60, max_restarts=1)
    await sampler.start()
    try:
        good = weight_update(make_lora_adapter(seed=1), version=0, incarnation=1, run_id="r")
        with pytest.raises(Unrecoverable, match="cannot load the learner's adapter version 4"):
            await sampler.load(msgspec.structs.replace(good, version=4, adapter_weights=b"not safetensors"))
        await sampler.load(good)  # the engine is fine: a good adapter loads
        assert sampler.ready and sampler.version == 0
    finally:
        sampler.shutdown()
    with pytest.raises(Unrecoverable, match="no config.json"):  # an engine that cannot start at all
        await ExplorerEngine(str(tmp_path / "missing"), "local", {}, name="explorer-t", adapter_dir=tmp_path,
                             start_timeout_s=60, load_timeout_s=60, request_timeout_s=60, max_restarts=1).start()


# --------------------------------------------------------------------------- a vLLM engine that dies


@pytest.mark.slow
async def test_a_killed_engine_is_restarted_in_place_with_the_same_adapter(tmp_path, make_lora_adapter, reference_logprobs):
    pytest.importorskip("vllm", reason="vLLM is not installed")
    from rlpipe.testing.embedded import default_model_path

    # The tiny architecture with random weights: near-uniform next tokens, so sequences run long
    # (the trained tiny model ends them after a few tokens); the adapters fit it.
    random_base = str(default_model_path(train_steps=0))
    config = make_config(tmp_path, max_staleness=1, base_model=random_base, sampler="vllm", max_engine_restarts=1)
    explorer = Explorer(config, "explorer-0")
    explorer.outbox = Outbox(explorer.dir)
    sampler = explorer.sampler
    adapter = make_lora_adapter(seed=11)
    others = set(engine_processes())  # the session's shared engine, if started: not ours to kill
    await sampler.start()
    try:
        await sampler.load(weight_update(adapter, version=7, incarnation=3, run_id=explorer.run_id))
        first_engine, before = sampler.engine, set(engine_processes()) - others
        assert before, "no engine core among this process's children"
        t0 = time.monotonic()
        rollout = asyncio.create_task(explorer._roll_out(CountingBuilder(0, 0, 8), SamplingParams(max_tokens=1000)))
        await asyncio.to_thread(wait_until, lambda: first_engine.unfinished_requests() > 0, 30, "decoding")
        assert not rollout.done(), "the group finished before the engine was killed; make it longer"
        for pid in before:
            os.kill(pid, signal.SIGKILL)
        group = await asyncio.wait_for(rollout, 300)  # the same builder, rolled out again on a new engine
        print(f"engine killed while decoding; the group was rolled out again on a new engine, "
              f"{time.monotonic() - t0:.1f} s in all")

        assert sampler.engine is not first_engine and sampler.restarts == 1
        assert (set(engine_processes()) - others).isdisjoint(before)
        assert explorer.stats["groups_retried_engine_dead"] == 1 and explorer.stats["engine_restarts"] == 1
        assert read_outbox_stats(explorer.dir)["engine_restarts"] == 1
        assert not group.failed and group.incarnation == 3 and group.run_id == explorer.run_id
        worst = 0.0
        for t in group.trajectories:
            actions = [(tok, lp, v) for tok, lp, v, m in zip(t.tokens, t.sampling_logprobs, t.policy_versions, t.action_mask) if m]
            assert {v for _, _, v in actions} == {7}
            ref = reference_logprobs(t.tokens[:4], [tok for tok, _, _ in actions], adapter, base=random_base)
            worst = max(worst, max(abs(lp - r) for (_, lp, _), r in zip(actions, ref)))
        print(f"after the restart: {sum(len(t.tokens) - 4 for t in group.trajectories)} tokens on version 7, "
              f"max |d logprob| vs peft {worst:.2e}")
        assert worst <= 1e-3  # the same adapter, not just the same version number

        for pid in set(engine_processes()) - others:  # past explorer.max_engine_restarts the next death fails the role
            os.kill(pid, signal.SIGKILL)
        with pytest.raises(Exception, match="max_engine_restarts = 1") as raised:
            await asyncio.wait_for(sampler.watch(), 60)
        assert type(raised.value).__name__ == "EngineDeadError"
    finally:
        await asyncio.to_thread(sampler.shutdown)
        explorer.outbox.close()
