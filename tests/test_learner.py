"""The learner's parts around its training step: latest.json read from any working directory,
the adapter published in the compute dtype, off the step's path and within the control
channel's frame limit, the batch timeout's message, and the Tinker versions kept by staleness.
Real Learners on the tiny model, real sockets; the Tinker SDK is a stand-in where named."""

import concurrent.futures
import json
import threading
import time
from pathlib import Path

import msgspec
import numpy as np
import pytest
import torch
from safetensors.torch import load as load_safetensors

from rlpipe import types
from rlpipe.pipeline import transport
from rlpipe.pipeline.buffer import STATS_FILE
from rlpipe.pipeline.control import ControlThread
from rlpipe.pipeline.fetch import BatchFetcher
from rlpipe.pipeline.learner import latest_checkpoint
from rlpipe.pipeline.transport import ControlClient, ControlServer, RequestServer, UpdateTooLarge, tcp_address
from rlpipe.training.checkpoint import ADAPTER_WEIGHTS, pruned
from tests.test_knobs import batch_of, group, learner_config, learners, trajectory


@pytest.fixture
def make_learner(tmp_path):
    with learners(tmp_path) as make:
        yield make


def train_one(learner, seed=0):
    rng = np.random.default_rng(seed)
    groups = [group([trajectory(rng, advantage=a) for a in (1.0, -1.0)], f"s{seed}-{i}") for i in range(4)]
    return learner._train(batch_of(groups), learner.minibatch_datums(groups))


def update(version=0):
    return types.WeightUpdate(version=version, step=version, run_id="r", incarnation=1)


# --------------------------------------------------------------------------- latest.json


def test_a_run_resumes_from_another_working_directory(tmp_path, monkeypatch, make_learner):
    (tmp_path / "here").mkdir()
    monkeypatch.chdir(tmp_path / "here")
    learner = make_learner(runs_dir=Path("runs"))  # a runs_dir relative to the working directory, as a TOML often has
    train_one(learner)
    learner._checkpoint()
    stored = json.loads((Path("runs/knobs/learner/latest.json")).read_text())
    assert stored["path"] == "learner/state/step-000001" and stored["format"] == 2  # relative to the run

    monkeypatch.chdir(tmp_path)  # from elsewhere: the same run is here/runs/knobs
    latest = latest_checkpoint(Path("here/runs/knobs"))
    assert latest["path"] == "here/runs/knobs/learner/state/step-000001" and Path(latest["path"]).is_dir()
    resumed = make_learner(runs_dir=Path("here/runs"), resume=True)
    assert resumed.step == 1 and resumed.client.step == 1
    for name, value in learner.client.training.trainable_state().items():
        assert torch.equal(resumed.client.training.trainable_state()[name], value)

    # A latest.json of format 1 held the path relative to the learner's working directory:
    # read from elsewhere, it names the same checkpoint by its name.
    old = {"path": "runs/knobs/learner/state/step-000001", "step": 1, "after_seq": 4}
    Path("here/runs/knobs/learner/latest.json").write_text(json.dumps(old))
    assert latest_checkpoint(Path("here/runs/knobs"))["path"] == "here/runs/knobs/learner/state/step-000001"
    tinker = {"path": "tinker://m/weights/step-000001", "step": 1, "after_seq": 4, "format": 2}
    Path("here/runs/knobs/learner/latest.json").write_text(json.dumps(tinker))
    assert latest_checkpoint(Path("here/runs/knobs"))["path"] == tinker["path"]


def test_pruning_keeps_the_newest_and_the_one_just_written():
    names = [f"step-{i:06d}" for i in range(1, 7)]
    assert pruned(names, 3, keep="step-000006") == names[:3]
    assert pruned(names, 1, keep="step-000002") == [n for n in names[:5] if n != "step-000002"]
    assert pruned(names, 0, keep="step-000006") == [] and pruned(names[:2], 3, keep="x") == []


# --------------------------------------------------------------------------- publishing


def published_weights(learner) -> dict[str, torch.Tensor]:
    return load_safetensors(learner.client.publish(learner.step).result()["adapter_weights"])


def test_the_adapter_is_published_in_the_learner_compute_dtype(tmp_path, make_learner):
    bf16 = make_learner(runs_dir=tmp_path / "bf16", dtype="bfloat16")  # as on CUDA, where the base is bfloat16
    assert {p.dtype for p in bf16.client.training.trainable_state().values()} == {torch.float32}  # peft's
    weights = published_weights(bf16)
    assert weights and {t.dtype for t in weights.values()} == {torch.bfloat16}
    state = bf16.client.training.trainable_state()
    assert all(torch.equal(weights[k], v.to(torch.bfloat16)) for k, v in state.items())
    fp32 = make_learner(runs_dir=tmp_path / "fp32")  # the CPU's default
    assert {t.dtype for t in published_weights(fp32).values()} == {torch.float32}
    bf16._checkpoint()  # checkpoints keep float32, for an exact resume
    saved = load_safetensors((tmp_path / "bf16/knobs/learner/state/step-000000/adapter" / ADAPTER_WEIGHTS).read_bytes())
    assert {t.dtype for t in saved.values()} == {torch.float32}


def test_an_adapter_over_the_frame_limit_fails_with_its_size(tmp_path, make_learner):
    with ControlServer(tcp_address()) as server:
        assert server.max_update_bytes == transport.CONTROL_MAX_BYTES == 1 << 30
    learner = make_learner()
    # A stand-in limit of 1,000 bytes (the real one is 1 GiB): the tiny model's adapter is over it.
    control = ControlThread(tcp_address(), max_update_bytes=1000)
    try:
        control.publish(update(), learner.client.publish(0))
        with pytest.raises(UpdateTooLarge) as failed:
            control.drain(30)
        size = len(learner.client.publish(0).result()["adapter_weights"])
        message = str(failed.value)
        assert "the adapter of version 0 is " in message and "over the 1,000 bytes" in message
        assert int(message.split(" is ")[1].split(" bytes")[0].replace(",", "")) > size  # its whole size
        assert "transport.CONTROL_MAX_BYTES" in message and "learner.rank" in message
        with pytest.raises(UpdateTooLarge):  # raised again wherever the learner checks
            control.wait(concurrent.futures.Future())
    finally:
        control.close()


def test_publishing_does_not_hold_up_the_next_step(tmp_path, make_learner, monkeypatch):
    """A slow send (a stand-in: ControlServer.publish made to take 5 s, as a large adapter to a
    slow network would) runs while the next step trains; the explorer gets the adapter as it
    was when published, not as the next step left it."""
    learner = make_learner()
    train_one(learner, seed=1)
    before = {k: v.clone() for k, v in learner.client.training.trainable_state().items()}
    send = ControlServer.publish

    def slow_send(self, update):
        time.sleep(5.0)
        send(self, update)

    monkeypatch.setattr(ControlServer, "publish", slow_send)
    address = tcp_address()
    control = ControlThread(address)
    explorer = ControlClient(address, "explorer-0")
    try:
        started = time.monotonic()
        learner._publish(control)
        train_one(learner, seed=2)  # the next step
        step_s = time.monotonic() - started
        assert control.publish_s is None and step_s < 5.0, f"the step waited for the send: {step_s:.2f} s"
        got = explorer.recv(timeout_s=30)
        assert isinstance(got, types.WeightUpdate) and got.version == 1 and got.incarnation == learner.incarnation
        weights = load_safetensors(got.adapter_weights)
        assert all(torch.equal(weights[k], v) for k, v in before.items())  # taken before the next step
        after = learner.client.training.trainable_state()
        assert any(not torch.equal(after[k], v) for k, v in before.items())  # which did move the adapter
        control.drain(10)
        assert control.publish_s >= 5.0
    finally:
        explorer.close()
        control.close()


def test_an_update_reaches_the_explorer_as_two_frames_without_a_copy_of_the_weights():
    address = tcp_address()
    weights = bytes(range(256)) * 4096
    with ControlServer(address) as server, ControlClient(address, "e") as client:
        deadline = time.monotonic() + 10
        while not server.peers and time.monotonic() < deadline:
            server.poll(0.05)
        server.publish(types.WeightUpdate(version=3, adapter_config=b"{}", adapter_weights=weights, step=3))
        assert server._latest_frames[1] is weights  # the very bytes object goes to ZeroMQ
        got = client.recv(timeout_s=10)
        assert got == types.WeightUpdate(version=3, adapter_config=b"{}", adapter_weights=weights, step=3)
        server.publish(types.WeightUpdate(version=4, sampler_path="tinker://m/sampler_weights/v000004"))
        assert client.recv(timeout_s=10).sampler_path.endswith("v000004")  # no weights: one frame


# --------------------------------------------------------------------------- the batch timeout


class FakeBuffer:
    """A RequestServer on a thread answering every BatchRequest with an empty Batch and these drops."""

    def __init__(self, dropped: dict[str, int]):
        self.address, self.dropped = tcp_address(), dropped
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self):
        with RequestServer(self.address) as server:
            while not self._stop.is_set():
                if (got := server.recv(0.05)) is not None:
                    server.reply(got[0], types.Batch(groups=[], seqs=[], dropped=self.dropped))

    def close(self):
        self._stop.set()
        self._thread.join(5)


def fetcher(tmp_path, batches: str, timeout_s: float = 1.0) -> BatchFetcher:
    config = learner_config(tmp_path)
    config = msgspec.structs.replace(config, learner=msgspec.structs.replace(config.learner, batch_timeout_s=timeout_s),
                                     addresses=msgspec.structs.replace(config.addresses, batches=batches))
    return BatchFetcher(config, "r", 1, lambda: 0, lambda groups: [])


def test_the_batch_timeout_says_what_the_buffer_dropped(tmp_path):
    buffer = FakeBuffer({"stale": 3, "env_error": 2, "no_signal": 5, "other_run": 1})
    run_dir = tmp_path / "knobs"
    run_dir.mkdir()
    (run_dir / STATS_FILE).write_text(json.dumps({"received": 11, "admission": {
        "requests": 9, "granted": 7, "budget": 2, "learner": None,
        "explorers": {"explorer-0": {"outstanding": 2, "holding": 2, "version": 3}}}}))
    fetch = fetcher(tmp_path, buffer.address)
    control = ControlThread(tcp_address())
    try:
        started = time.monotonic()
        with pytest.raises(TimeoutError) as timed_out:  # through the learner's wait, which must not spin on it
            control.wait(fetch.submit(0, 0))
        assert time.monotonic() - started < 10
    finally:
        control.close()
        fetch.close()
        buffer.close()
    message = str(timed_out.value)
    assert message.startswith("no full batch within 1 s (0/4 groups): the buffer has dropped 3 stale (sampled more "
                              "than max_staleness versions before), 0 invalid, 2 env_error (the env raised"), message
    assert "5 no_signal (every reward of the group equal: buffer.drop_constant_reward_groups), 1 other_run;" in message
    assert ("admission: 7 credits granted on 9 requests, requests that got none: budget 2; "
            "explorer-0 holds 2 (adapter version 3); are the explorers running?") in message


def test_the_batch_timeout_says_when_the_buffer_never_answered(tmp_path):
    fetch = fetcher(tmp_path, tcp_address(), timeout_s=0.5)  # nothing listens there
    try:
        with pytest.raises(TimeoutError, match=r"\(0/4 groups\): the buffer at tcp://127\.0\.0\.1:\d+ never answered"):
            fetch.submit(0, 0).result(timeout=30)
    finally:
        fetch.close()


# --------------------------------------------------------------------------- Tinker versions


class DoneFuture(concurrent.futures.Future):
    def __init__(self, value):
        super().__init__()
        self.set_result(value)


class FakeSDK:
    """A stand-in for the tinker SDK's training client and REST client (what is tested is the
    bookkeeping of TinkerTrainingClient, not the endpoint)."""

    def __init__(self):
        self.deleted = []

    def save_weights_for_sampler(self, name):
        return DoneFuture(types.SaveResponse(path=f"tinker://m/sampler_weights/{name}"))

    def create_rest_client(self):
        return self

    def delete_checkpoint_from_tinker_path(self, path):
        self.deleted.append(path)
        return DoneFuture(None)


@pytest.mark.parametrize("max_staleness", [0, 1, 4])
def test_tinker_keeps_max_staleness_plus_two_published_versions(tmp_path, max_staleness):
    from rlpipe.pipeline.tinker.training import TinkerTrainingClient

    config = msgspec.structs.replace(learner_config(tmp_path), max_staleness=max_staleness,
                                     tinker_base_url="http://127.0.0.1:9", tinker_api_key="tml-x")
    client = TinkerTrainingClient(config, types.LoraConfig(rank=4), tmp_path / "learner")
    client._client = client.service = sdk = FakeSDK()
    paths = [client.publish(v).result()["sampler_path"] for v in range(12)]
    kept = max_staleness + 2
    assert client.keep_versions == kept and client._published == paths[-kept:]
    assert sdk.deleted == paths[:-kept]  # oldest first, each once
