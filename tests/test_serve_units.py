"""The pieces of `rlpipe serve` that need no server: the future store, the per-model queue's
seq_id order, tinker:// paths, and the protobuf decoding of bad bodies."""

import asyncio
import subprocess

import numpy as np
import pytest

pytest.importorskip("tinker")
from tinker.proto import tinker_public_pb2 as pb

from rlpipe.serve import trainers, wire
from rlpipe.serve.futures import Futures, UserError
from rlpipe.serve.registry import Registry, UnknownPath, parse_tinker_path, tinker_path


async def test_a_poll_is_held_then_answered_and_retries_share_a_future():
    futures = Futures(hold_s=0.05)
    entry, fresh = futures.new("optim_step", key=("model", "m", 3))
    again, fresh_again = futures.new("optim_step", key=("model", "m", 3))
    assert fresh and not fresh_again and again is entry
    assert await futures.wait(entry) is False  # held hold_s, then "try again"
    asyncio.get_running_loop().call_later(0.01, futures.finish, entry, {"metrics": {}})
    assert await futures.wait(entry) is True and entry.body == {"metrics": {}}


async def test_queue_runs_in_seq_order_waits_briefly_for_a_gap_and_survives_failures(monkeypatch):
    monkeypatch.setattr(trainers, "GAP_WAIT_S", 0.2)
    futures = Futures()
    queue = trainers.ModelQueue("m", futures)
    ran = []

    def job(seq, fail=False):
        async def run():
            ran.append(seq)
            if fail:
                raise ValueError(f"bad input in {seq}")
            return {"seq": seq}
        return run

    entries = {}
    for seq in (3, 2, 1):  # chunks of one call arrive lowest last
        entries[seq], _ = futures.new("fb")
        queue.submit(seq, entries[seq], job(seq, fail=seq == 2))
    await asyncio.wait_for(entries[3].done.wait(), 5)
    assert ran == [1, 2, 3]
    assert entries[2].error["category"] == "user" and entries[3].body == {"seq": 3}
    entries[5], _ = futures.new("fb")  # seq 4 never comes: 5 runs after GAP_WAIT_S
    queue.submit(5, entries[5], job(5))
    await asyncio.wait_for(entries[5].done.wait(), 5)
    assert ran == [1, 2, 3, 5]
    queue.close()


def test_tinker_paths_round_trip_and_bad_ones_are_refused(tmp_path):
    path = tinker_path("sess-1:train:0", "sampler", "step-3")
    assert path == "tinker://sess-1:train:0/sampler_weights/step-3"
    assert parse_tinker_path(path) == ("sess-1:train:0", "sampler", "step-3")
    for bad in ("tinker://x/weights", "tinker://x/other/n", "http://x/weights/n", "tinker://x/weights/a/b", 7):
        with pytest.raises(ValueError):
            parse_tinker_path(bad)
    registry = Registry(tmp_path)
    with pytest.raises(UnknownPath):
        registry.checkpoint(tinker_path("nobody:train:0", "training", "n"))


def test_protobuf_bodies_that_do_not_add_up_are_user_errors():
    msg = pb.ForwardBackwardRequest(model_id="m", seq_id=1, loss_fn="cross_entropy")
    d = msg.data.add()
    d.model_input.add().encoded_text.tokens = np.arange(4, dtype=np.int32).tobytes()
    t = d.loss_fn_inputs["target_tokens"]
    t.dense, t.dtype, t.shape[:] = np.arange(3, dtype=np.int64).tobytes(), pb.DTYPE_INT64, [4]  # 3 values, shape 4
    with pytest.raises(UserError, match="needs 4 values"):
        wire.decode_forward_backward(msg.SerializeToString())
    t.dense = b"\x00" * 5
    with pytest.raises(UserError, match="whole number"):
        wire.decode_forward_backward(msg.SerializeToString())
    with pytest.raises(UserError, match="malformed"):
        wire.decode_forward_backward(b"\xff\xff\xff")
    d.model_input.add().image.data = b"png"
    t.dense = np.arange(4, dtype=np.int64).tobytes()
    with pytest.raises(UserError, match="text models only"):
        wire.decode_forward_backward(msg.SerializeToString())


async def test_silent_sessions_lose_their_models_and_expired_checkpoints_go(tmp_path):
    from rlpipe.serve.app import Server

    server = Server({}, tmp_path, session_timeout_s=0.2)
    server.registry.add_session("s1", [], {})
    server.last_seen["s1"] = 0.0  # long ago
    server.trainers.session_of["s1:train:0"] = "s1"
    for name, ttl in (("old", 1e-3), ("new", 3600)):
        folder = tmp_path / name
        folder.mkdir()
        (folder / "f").write_bytes(b"x")
        server.registry.add_checkpoint("s1:train:0", "training", name, folder, ttl)
    await asyncio.sleep(0.01)
    await server._reap_once()
    assert server.trainers.session_of == {} and "s1" not in server.last_seen
    assert not (tmp_path / "old").exists() and (tmp_path / "new").exists()
    assert [c["name"] for c in server.registry.checkpoints("s1:train:0")] == ["new"]
    bystander = subprocess.Popen(["sleep", "30"])  # an app in a process of others: their children stay
    await server.close()
    assert bystander.poll() is None
    bystander.kill()
    bystander.wait()
