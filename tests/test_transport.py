"""The transport over real ZeroMQ sockets (tcp on 127.0.0.1 and ipc), no mocks."""

import threading
import time
import typing

import msgspec
import pytest
import zmq
from zmq.utils.monitor import recv_monitor_message

from rlpipe.pipeline.transport import (
    EXPERIENCE_MAX_BYTES,
    SMALL_MAX_BYTES,
    ControlClient,
    ControlServer,
    RequestClient,
    RequestServer,
    free_port,
    tcp_address,
)
from rlpipe.types import (
    Batch,
    BatchRequest,
    CreditGrant,
    CreditRequest,
    GroupAck,
    Heartbeat,
    Message,
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
    GroupAck(group_id="g0", outcome="duplicate"),
    WeightUpdate(version=7, adapter_config=b"{}", adapter_weights=b"\x00st\xff" * 100, step=70),
    Heartbeat(sender="e1", time=123.25, version=6),
    Ready(sender="e1"),
    Shutdown(reason="done"),
    BatchRequest(sender="learner", learner_version=3, after_seq=10, max_groups=8),
    Batch(groups=[group("a"), group("b")], seqs=[11, 12], dropped={"stale": 2, "invalid": 1}),
    CreditRequest(sender="e1", version=3, incarnation=1, holding=2, started=9, want=4, oldest=2),
    CreditGrant(start_until=12, lease_s=6.0, reason="budget"),
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


def echo(msg):
    return msg


class ServerThread:
    """A RequestServer in its own thread (a ZeroMQ socket stays in one thread). Answers each
    request with answer(msg) after delay_s; keeps what it received and, once closed, what
    its codec rejected."""

    def __init__(self, address, answer=echo, delay_s=0.0, **server_options):
        self.address, self.answer, self.delay_s, self.server_options = address, answer, delay_s, server_options
        self.received = []
        self.rejected = None
        self.stop = threading.Event()
        self.ready = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        assert self.ready.wait(5)

    def _run(self):
        with RequestServer(self.address, **self.server_options) as server:
            self.ready.set()
            while not self.stop.is_set():
                if (got := server.recv(timeout_s=0.02)) is not None:
                    to, req = got
                    self.received.append(req)
                    time.sleep(self.delay_s)
                    server.reply(to, self.answer(req))
            self.rejected = dict(server.codec.rejected)

    def close(self):
        self.stop.set()
        self.thread.join(5)
        assert not self.thread.is_alive()


def test_roundtrip_every_message_type(address):
    assert {type(m) for m in ALL_MESSAGES} == set(typing.get_args(Message))  # a new type needs a case here
    server = ServerThread(address)
    with RequestClient(address) as client:
        replies = [client.request(msg, timeout_s=2) for msg in ALL_MESSAGES]
        client_rejected = client.codec.rejected
    server.close()
    assert server.received == ALL_MESSAGES  # client -> server
    assert replies == ALL_MESSAGES  # and back
    assert server.rejected == {} and client_rejected == {}


def test_bad_frames_are_rejected_counted_and_skipped(address):
    enc = msgspec.msgpack.encode
    reasons = []
    with RequestServer(address, max_message_bytes=1000, on_reject=reasons.append) as server:
        dealer = raw_socket(zmq.DEALER, address)
        dealer.send_multipart([b"1", b"\xc1\x00garbage"])                       # not msgpack
        dealer.send_multipart([b"2", enc({"type": "group", "group_id": 5})])   # known tag, wrong schema
        dealer.send_multipart([b"3", enc({"type": "launch_missiles"})])        # unknown tag
        dealer.send_multipart([b"4", enc(Ready(sender="x" * 1500))])           # valid but oversize
        dealer.send(enc(Ready(sender="a")))                                     # no request id
        dealer.send_multipart([b"5", enc(Ready(sender="a")), b"extra"])        # one frame too many
        dealer.send_multipart([b"good", enc(Ready(sender="good"))])
        to, msg = server.recv(timeout_s=2)
        assert msg == Ready(sender="good")
        assert reasons == ["not_msgpack", "schema", "unknown_tag", "oversize", "framing", "framing"]
        assert server.codec.rejected == {"not_msgpack": 1, "schema": 1, "unknown_tag": 1, "oversize": 1,
                                         "framing": 2}
        # The garbage cost that connection nothing: it is still answered.
        assert server.reply(to, GroupAck(group_id="g", outcome="accepted"))
        assert dealer.poll(2000)
        assert dealer.recv_multipart() == [b"good", enc(GroupAck(group_id="g", outcome="accepted"))]
        dealer.close()


def test_bad_replies_are_rejected_counted_and_skipped():
    enc = msgspec.msgpack.encode
    address = tcp_address()
    bound, done = threading.Event(), threading.Event()

    def rogue_server():
        router = zmq.Context.instance().socket(zmq.ROUTER)
        router.setsockopt(zmq.LINGER, 1000)
        router.bind(address)
        bound.set()
        if router.poll(5000):
            ident, req_id, _ = router.recv_multipart()
            router.send_multipart([ident, req_id, b"\xc1"])                                 # not msgpack
            router.send_multipart([ident, req_id, enc({"type": "group_ack"})])              # wrong schema
            router.send_multipart([ident, req_id])                                         # no message
            router.send_multipart([ident, b"earlier!", enc(GroupAck(group_id="x", outcome="a"))])  # stale
            router.send_multipart([ident, req_id, enc(GroupAck(group_id="g0", outcome="accepted"))])
            done.wait(5)  # closing right away could lose the replies (see RequestClient: IMMEDIATE)
        router.close()

    thread = threading.Thread(target=rogue_server, daemon=True)
    thread.start()
    assert bound.wait(5)
    with RequestClient(address) as client:
        assert client.request(group(), timeout_s=2) == GroupAck(group_id="g0", outcome="accepted")
        assert client.codec.rejected == {"not_msgpack": 1, "schema": 1, "framing": 1, "stale_reply": 1}
    done.set()
    thread.join(5)


def _next_event(monitor, timeout_s=2.0):
    assert monitor.poll(int(timeout_s * 1000)), "no socket event in time"
    return recv_monitor_message(monitor)["event"]


def test_frame_over_hard_cap_drops_connection_not_server():
    # Beyond ZMQ_MAXMSGSIZE (by default twice max_message_bytes) libzmq drops the sender's
    # connection before allocating the frame; the server keeps serving other peers.
    address = tcp_address()
    server = ServerThread(address, max_message_bytes=1000)
    rogue = zmq.Context.instance().socket(zmq.DEALER)
    rogue.setsockopt(zmq.LINGER, 0)
    monitor = rogue.get_monitor_socket(zmq.EVENT_CONNECTED | zmq.EVENT_DISCONNECTED)
    rogue.connect(address)
    try:
        assert _next_event(monitor) == zmq.EVENT_CONNECTED
        rogue.send_multipart([b"1", b"\x00" * 10_000])
        assert _next_event(monitor) == zmq.EVENT_DISCONNECTED
        with RequestClient(address) as client:
            assert client.request(Ready(sender="after"), timeout_s=2) == Ready(sender="after")
    finally:
        rogue.disable_monitor()
        monitor.close()
        rogue.close()
        server.close()
    # Dropped below the codec: never decoded, so not counted (the soft limit is what counts).
    assert server.rejected == {}
    assert server.received == [Ready(sender="after")]


def test_client_refuses_oversize_requests():
    address = tcp_address()
    server = ServerThread(address)
    with RequestClient(address, max_request_bytes=100) as client:
        with pytest.raises(ValueError, match=r"Ready is \d+ bytes, over max_request_bytes=100"):
            client.request(Ready(sender="x" * 200), timeout_s=2)
        assert client.request(Ready(sender="ok"), timeout_s=2) == Ready(sender="ok")
    server.close()
    assert server.received == [Ready(sender="ok")]  # the refused one never left


def test_request_limit_is_not_the_reply_limit():
    # An explorer takes only small replies (GroupAcks) but sends groups far bigger than that.
    big = group("big", n=100_000)
    assert SMALL_MAX_BYTES < len(msgspec.msgpack.encode(big)) < EXPERIENCE_MAX_BYTES
    address = tcp_address()
    server = ServerThread(address, answer=lambda g: GroupAck(group_id=g.group_id, outcome="accepted"),
                          max_message_bytes=EXPERIENCE_MAX_BYTES)
    with RequestClient(address, max_message_bytes=SMALL_MAX_BYTES) as client:
        assert client.request(big, timeout_s=5) == GroupAck(group_id="big", outcome="accepted")
    server.close()
    assert server.received == [big]


def test_recv_timeout_returns_none_quickly(address):
    with RequestServer(address) as server:
        t0 = time.monotonic()
        assert server.recv(timeout_s=0.1) is None
        elapsed = time.monotonic() - t0
    assert 0.09 <= elapsed < 0.5


def test_request_to_a_server_that_is_gone_returns_none_in_time(address):
    server = ServerThread(address)
    with RequestClient(address) as client:
        monitor = client.socket.get_monitor_socket(zmq.EVENT_DISCONNECTED)
        try:
            assert client.request(Ready(sender="before"), timeout_s=2) == Ready(sender="before")
            server.close()
            assert _next_event(monitor) == zmq.EVENT_DISCONNECTED  # the client knows it is gone
        finally:
            client.socket.disable_monitor()
            monitor.close()
        t0 = time.monotonic()
        assert client.request(Ready(sender="while gone"), timeout_s=0.2) is None
        assert 0.19 <= time.monotonic() - t0 < 1.0
        # IMMEDIATE: what was asked while the server was gone is not delivered to its successor.
        server = ServerThread(address)
        for _ in range(20):
            if client.request(Ready(sender="after"), timeout_s=0.5) is not None:
                break
        server.close()
    assert server.received and all(m == Ready(sender="after") for m in server.received), server.received


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


def test_control_flood_is_handled_a_bounded_slice_per_poll():
    # The learner calls poll() between steps: a flood must not hold its loop in one call.
    address = tcp_address()
    with ControlServer(address) as server:
        bound = server.max_frames_per_poll
        flood = 1000
        assert 3 * bound < flood
        flooder = raw_socket(zmq.DEALER, address)
        for _ in range(flood):
            flooder.send(b"\xc1garbage")
        flooder.send(msgspec.msgpack.encode(Heartbeat(sender="flooder", time=1.0, version=3)))
        time.sleep(0.5)  # let the flood arrive, so that an unbounded poll would take it in one call
        taken, heartbeat_call = [], None
        for call in range(30):
            before = sum(server.codec.rejected.values())
            handled = server.poll(timeout_s=0.05)
            taken.append(sum(server.codec.rejected.values()) - before + handled)
            if handled:
                heartbeat_call = call
                break
        flooder.close()
        assert taken[0] == bound and max(taken) <= bound, taken
        # Behind the flood, in order: it cannot come before the flood's last slice.
        assert heartbeat_call is not None and heartbeat_call >= flood // bound, taken
        assert sum(taken) == flood + 1
        assert server.codec.rejected == {"not_msgpack": flood}
        assert [(p.name, p.version) for p in server.peers.values()] == [("flooder", 3)]


def _pump(server, client, timeout_s=3.0):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        server.poll(timeout_s=0.02)
        if (msg := client.recv(timeout_s=0.02)) is not None:
            return msg
    raise AssertionError("no control message arrived")


def BatchServerThread(address, delay_s=0.0):
    """A tiny stand-in buffer: answers each BatchRequest with its after_seq + 1, after `delay_s`."""
    return ServerThread(address, answer=lambda req: Batch(groups=[], seqs=[req.after_seq + 1]), delay_s=delay_s)


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
    with RequestServer(f"tcp://127.0.0.1:{port}") as server:
        assert server.address == f"tcp://127.0.0.1:{port}"
