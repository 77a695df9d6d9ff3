"""The transport over real ZeroMQ sockets (tcp on 127.0.0.1 and ipc), no mocks."""

import asyncio
import threading
import time

import msgspec
import pytest
import zmq

from rlpipe.pipeline.transport import (
    ControlClient,
    ControlServer,
    Receiver,
    RequestClient,
    RequestServer,
    Sender,
    TransportTimeout,
    free_port,
    tcp_address,
)
from rlpipe.types import (
    Batch,
    BatchRequest,
    Heartbeat,
    Ready,
    Shutdown,
    Trajectory,
    TrajectoryGroup,
    WeightUpdate,
)


def group(gid="g0", n=4):
    traj = Trajectory(tokens=list(range(n)), action_mask=[0, 0, 1, 1][:n] + [1] * (n - 4),
                      sampling_logprobs=[0.0, 0.0] + [-0.5] * (n - 2), policy_versions=[-1, -1] + [3] * (n - 2),
                      reward=1.0, advantage=0.5, stop_reason="stop", metrics={"len": float(n)})
    return TrajectoryGroup(group_id=gid, trajectories=[traj, traj], explorer_id="e1", created_at=12.5)


ALL_MESSAGES = [
    group(),
    TrajectoryGroup(group_id="bad", trajectories=[], failed=True, error="env timed out"),
    WeightUpdate(version=7, adapter_config=b"{}", adapter_weights=b"\x00st\xff" * 100, step=70),
    Heartbeat(sender="e1", time=123.25, version=6),
    Ready(sender="e1"),
    Shutdown(reason="done"),
    BatchRequest(sender="learner", learner_version=3, after_seq=10, max_groups=8),
    Batch(groups=[group("a"), group("b")], seqs=[11, 12], dropped={"stale": 2, "invalid": 1}),
]


@pytest.fixture(params=["tcp", "ipc"])
def address(request, tmp_path):
    if request.param == "tcp":
        return tcp_address()
    return f"ipc://{tmp_path}/sock"


def raw_socket(kind, address):
    sock = zmq.Context.instance().socket(kind)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(address)
    return sock


def test_roundtrip_every_message_type(address):
    with Receiver(address) as rx, Sender(address) as tx:
        for msg in ALL_MESSAGES:
            tx.send(msg, timeout_s=2)
        got = [rx.recv(timeout_s=2) for _ in ALL_MESSAGES]
    assert got == ALL_MESSAGES
    assert rx.rejected == {}


def test_bad_frames_are_rejected_counted_and_skipped(address):
    enc = msgspec.msgpack.encode
    with Receiver(address, max_message_bytes=1000) as rx:
        push = raw_socket(zmq.PUSH, address)
        push.send(b"\xc1\x00garbage")                                # not msgpack
        push.send(enc({"type": "group", "group_id": 5}))             # known tag, wrong schema
        push.send(enc({"type": "launch_missiles"}))                  # unknown tag
        push.send(enc(Ready(sender="x" * 1500)))                     # valid but oversize
        push.send_multipart([enc(Ready(sender="a")), b"extra"])     # wrong framing
        push.send(enc(Ready(sender="good")))
        assert rx.recv(timeout_s=2) == Ready(sender="good")
        push.close()
    assert rx.rejected == {"not_msgpack": 1, "schema": 1, "unknown_tag": 1, "oversize": 1, "framing": 1}


def test_frame_over_hard_cap_drops_connection_not_receiver():
    # Beyond ZMQ_MAXMSGSIZE libzmq drops the sender's connection before allocating the frame;
    # the receiver itself keeps serving other (and reconnected) senders.
    address = tcp_address()
    with Receiver(address, max_message_bytes=1000, hard_max_bytes=4000) as rx:
        rogue = raw_socket(zmq.PUSH, address)
        rogue.send(b"\x00" * 10_000)
        rogue.close()
        with Sender(address) as tx:
            tx.send(Ready(sender="after"), timeout_s=2)
            assert rx.recv(timeout_s=2) == Ready(sender="after")


def test_sender_refuses_oversize_messages():
    with Sender(tcp_address(), max_message_bytes=100) as tx:
        with pytest.raises(ValueError, match="max_message_bytes"):
            tx.send(Ready(sender="x" * 200), timeout_s=0.1)


def test_recv_timeout_returns_none_quickly(address):
    with Receiver(address) as rx:
        t0 = time.monotonic()
        assert rx.recv(timeout_s=0.1) is None
        elapsed = time.monotonic() - t0
    assert 0.09 <= elapsed < 0.5


def test_send_times_out_when_receiver_is_gone_and_hwm_full(address):
    rx = Receiver(address)
    rx.close()  # the receiver is gone: nothing drains the sender's queue
    with Sender(address, sndhwm=4, linger_ms=0) as tx:
        t0 = time.monotonic()
        with pytest.raises(TransportTimeout, match="could not send"):
            for _ in range(100):
                tx.send(Ready(sender="e"), timeout_s=0.05)
        assert time.monotonic() - t0 < 2.0


async def test_asend_waits_without_blocking_the_event_loop():
    address = tcp_address()
    with Sender(address, sndhwm=1) as tx:
        # Nothing to receive yet: the queue fills and asend waits while other tasks run.
        ticks = 0

        async def ticker():
            nonlocal ticks
            while True:
                ticks += 1
                await asyncio.sleep(0.005)

        task = asyncio.create_task(ticker())
        with pytest.raises(TransportTimeout):
            for _ in range(100):
                await tx.asend(Ready(sender="e"), timeout_s=0.1)
        assert ticks >= 5
        with Receiver(address) as rx:  # a receiver appears: the queued messages flow
            await tx.asend(Ready(sender="late"), timeout_s=2)
            got = []
            while (msg := rx.recv(timeout_s=2)) is not None:
                got.append(msg)
                if msg == Ready(sender="late"):
                    break
        task.cancel()
    assert got[-1] == Ready(sender="late") and all(m == Ready(sender="e") for m in got[:-1])


def test_ready_handshake_gives_late_joiner_the_latest_update(address):
    with ControlServer(address) as server:
        server.publish(WeightUpdate(version=1, adapter_config=b"{}", adapter_weights=b"v1"))
        server.publish(WeightUpdate(version=2, adapter_config=b"{}", adapter_weights=b"v2"))  # nobody registered yet
        with ControlClient(address, "explorer-0") as client:
            got = _pump(server, client)
            assert got == WeightUpdate(version=2, adapter_config=b"{}", adapter_weights=b"v2")  # the latest, not v1
            server.publish(WeightUpdate(version=3, adapter_config=b"{}", adapter_weights=b"v3"))
            assert client.recv(timeout_s=2) == WeightUpdate(version=3, adapter_config=b"{}", adapter_weights=b"v3")
            assert [p.name for p in server.peers.values()] == ["explorer-0"]
            server.shutdown("bye")
            assert client.recv(timeout_s=2) == Shutdown(reason="bye")


def test_explorer_that_registers_after_shutdown_is_told_to_stop(address):
    with ControlServer(address) as server:
        server.publish(WeightUpdate(version=4, adapter_config=b"{}", adapter_weights=b"v4"))
        server.shutdown("finished")  # nobody registered yet
        with ControlClient(address, "late") as client:
            # A learner that finished before this explorer's first Ready still stops it, and
            # does not hand it an adapter to start sampling with.
            assert _pump(server, client) == Shutdown(reason="finished")


def test_explorer_that_connects_before_the_learner_binds_is_registered():
    address = tcp_address()
    with ControlClient(address, "early") as client:  # Ready waits in the DEALER's queue
        time.sleep(0.2)
        with ControlServer(address) as server:
            server.publish(WeightUpdate(version=5, adapter_config=b"{}", adapter_weights=b"v5"))
            assert _pump(server, client) == WeightUpdate(version=5, adapter_config=b"{}", adapter_weights=b"v5")


def test_silent_peer_is_forgotten_and_heartbeat_reregisters(address):
    with ControlServer(address, peer_timeout_s=0.5) as server:
        server.publish(WeightUpdate(version=1, adapter_config=b"{}", adapter_weights=b"v1"))
        with ControlClient(address, "e", heartbeat_s=0.1) as client:
            assert _pump(server, client).version == 1
            client.version = 1
            for _ in range(5):  # heartbeats keep it registered past peer_timeout_s
                client.recv(timeout_s=0.1)
                server.poll()
            assert [p.version for p in server.peers.values()] == [1]
            time.sleep(0.7)  # silent beyond the timeout
            server.poll()
            assert server.peers == {}
            # Its next heartbeat registers it again and it is owed the latest update again.
            assert _pump(server, client) == WeightUpdate(version=1, adapter_config=b"{}", adapter_weights=b"v1")


def _pump(server, client, timeout_s=3.0):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        server.poll(timeout_s=0.02)
        if (msg := client.recv(timeout_s=0.02)) is not None:
            return msg
    raise AssertionError("no control message arrived")


class BatchServerThread:
    """A tiny stand-in buffer: answers each BatchRequest with its after_seq + 1, after `delay_s`."""

    def __init__(self, address, delay_s=0.0):
        self.address, self.delay_s = address, delay_s
        self.stop = threading.Event()
        self.ready = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        assert self.ready.wait(5)

    def _run(self):
        with RequestServer(self.address) as server:
            self.ready.set()
            while not self.stop.is_set():
                if (got := server.recv(timeout_s=0.02)) is not None:
                    to, req = got
                    time.sleep(self.delay_s)
                    server.reply(to, Batch(groups=[], seqs=[req.after_seq + 1]))

    def close(self):
        self.stop.set()
        self.thread.join(5)


def request(client, after_seq, timeout_s=0.5):
    return client.request(BatchRequest(sender="l", learner_version=0, after_seq=after_seq, max_groups=1),
                          timeout_s=timeout_s)


def test_batch_request_survives_a_restarted_server():
    address = tcp_address()
    server = BatchServerThread(address)
    with RequestClient(address) as client:
        assert request(client, 1).seqs == [2]
        server.close()
        assert request(client, 2, timeout_s=0.2) is None  # server down: a timeout, not a hang
        server = BatchServerThread(address)
        # The caller just asks again; the DEALER has reconnected by itself.
        reply = None
        for _ in range(20):
            if (reply := request(client, 3)) is not None:
                break
        assert reply.seqs == [4]
        server.close()


def test_late_reply_is_not_taken_for_the_next_answer():
    address = tcp_address()
    server = BatchServerThread(address, delay_s=0.3)
    with RequestClient(address) as client:
        assert request(client, 1, timeout_s=0.1) is None  # its reply arrives later
        assert request(client, 5, timeout_s=2).seqs == [6]  # not [2]
        assert client.codec.rejected == {"stale_reply": 1}
    server.close()


def test_restarted_client_is_served_by_the_same_server():
    address = tcp_address()
    server = BatchServerThread(address)
    for after in (1, 2):
        with RequestClient(address) as client:
            assert request(client, after, timeout_s=2).seqs == [after + 1]
    server.close()


def test_free_port_is_bindable():
    port = free_port()
    with Receiver(f"tcp://127.0.0.1:{port}") as rx:
        assert rx.address == f"tcp://127.0.0.1:{port}"
