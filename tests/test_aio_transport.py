"""The explorer's asyncio ends of the channels (pipeline/aio_transport.py) against the roles'
synchronous ends over real sockets, and the supervised-loop skeleton (pipeline/supervised.py)."""

from __future__ import annotations

import threading
import time

import anyio
import pytest
import zmq

from rlpipe.pipeline import aio_transport
from rlpipe.pipeline.supervised import Supervised
from rlpipe.pipeline.transport import ControlServer, RequestServer, tcp_address
from rlpipe.types import CreditGrant, CreditRequest, Ready, Shutdown, WeightUpdate


def serve_in_thread(address: str, answer, stop: threading.Event) -> threading.Thread:
    """A RequestServer answering each request with answer(msg) (None: no reply) until stop."""
    bound = threading.Event()

    def run():
        with RequestServer(address) as server:
            bound.set()
            while not stop.is_set():
                if (got := server.recv(0.05)) is not None and (reply := answer(got[1])) is not None:
                    server.reply(got[0], reply)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    assert bound.wait(10)
    return thread


async def test_requests_get_their_own_reply_and_a_late_one_is_rejected():
    address, stop, asked = tcp_address(), threading.Event(), []

    def answer(msg: CreditRequest):
        asked.append(msg.started)
        if msg.started == 1:
            time.sleep(0.5)  # answers after the client gave up
        return CreditGrant(start_until=msg.started + 10, lease_s=1.0)

    thread = serve_in_thread(address, answer, stop)
    client = aio_transport.RequestClient(address)
    try:
        request = CreditRequest(sender="e", version=0, incarnation=1, holding=0, started=0, want=1)
        assert await client.request(request, 5) == CreditGrant(start_until=10, lease_s=1.0)
        late = CreditRequest(sender="e", version=0, incarnation=1, holding=0, started=1, want=1)
        assert await client.request(late, 0.2) is None  # timed out
        again = CreditRequest(sender="e", version=0, incarnation=1, holding=0, started=2, want=1)
        assert await client.request(again, 5) == CreditGrant(start_until=12, lease_s=1.0)  # not the late 11
        assert client.codec.rejected == {"stale_reply": 1} and asked == [0, 1, 2]
        with pytest.raises(ValueError, match="over max_request_bytes"):
            await aio_transport.RequestClient(address, max_request_bytes=10).request(request, 1)
    finally:
        client.close()
        stop.set()
        thread.join(10)


async def test_a_request_with_no_server_times_out():
    client = aio_transport.RequestClient(tcp_address())
    try:
        start = time.monotonic()
        assert await client.request(Ready(sender="e"), 0.3) is None
        assert 0.25 < time.monotonic() - start < 2
    finally:
        client.close()


async def test_control_client_registers_heartbeats_and_takes_updates_in_one_or_two_frames():
    address = tcp_address()
    update = WeightUpdate(version=3, adapter_config=b"{}", adapter_weights=b"\x00w" * 50, run_id="r", incarnation=1)
    with ControlServer(address) as server:
        server.publish(update)
        client = aio_transport.ControlClient(address, "explorer-0", heartbeat_s=0.1)
        try:
            async with anyio.create_task_group() as tasks:
                tasks.start_soon(client.heartbeats)
                got = None
                for _ in range(100):  # the learner answers the Ready with the latest update
                    server.poll()
                    if (got := await client.recv(0.05)) is not None:
                        break
                assert got == update
                client.version = 3
                for _ in range(10):  # heartbeats report the version
                    server.poll(0.05)
                    await anyio.sleep(0.05)
                assert [(p.name, p.version) for p in server.peers.values()] == [("explorer-0", 3)]
                # The weights as a frame of their own after the update without them, then a Shutdown.
                ident = next(iter(server.peers))
                header = server.codec.encode(WeightUpdate(version=4, adapter_config=b"{}", run_id="r", incarnation=1))
                server.socket.send_multipart([ident, header, b"weights-v4"])
                server.socket.send_multipart([ident, server.codec.encode(Shutdown(reason="done"))])
                server.socket.send_multipart([ident, b"a", b"b", b"c"])  # three frames: no message
                assert await client.recv(5) == WeightUpdate(version=4, adapter_config=b"{}", adapter_weights=b"weights-v4",
                                                            run_id="r", incarnation=1)
                await anyio.sleep(0.2)
                assert client.recv_ready() == [Shutdown(reason="done")]
                assert client.codec.rejected == {"framing": 1}
                assert await client.recv(0.1) is None
                tasks.cancel_scope.cancel()
        finally:
            client.close()


def test_supervised_runs_alone_until_stopped_and_keeps_its_error():
    rounds, woken = [], threading.Event()

    async def body():
        while True:
            rounds.append(time.monotonic())
            if len(rounds) == 3:
                woken.set()
            await loop.nap(60)  # only wake() ends this nap

    loop = Supervised(body, "test-loop")
    loop.start()
    try:
        for _ in range(2):
            time.sleep(0.1)
            loop.wake()  # from this thread, into the loop's
        assert woken.wait(5) and loop.alive
    finally:
        loop.stop(5)
    assert not loop.alive and loop.error is None and len(rounds) == 3

    async def failing():
        raise OSError("disk full")

    broken = Supervised(failing, "test-broken")
    broken.start()
    deadline = time.monotonic() + 5
    while broken.alive and time.monotonic() < deadline:
        time.sleep(0.02)
    broken.stop(5)
    assert isinstance(broken.error, OSError) and not broken.alive


async def test_a_supervised_error_ends_the_task_group_at_once():
    async def failing():
        await anyio.sleep(0.1)
        raise zmq.ZMQError(zmq.EINVAL, "bad socket")

    loop = Supervised(failing, "test-loop")
    start = time.monotonic()
    with pytest.raises(BaseExceptionGroup) as raised:
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(loop.run)
            tasks.start_soon(anyio.sleep, 60)  # cancelled by the error
    assert time.monotonic() - start < 5
    assert isinstance(raised.value.exceptions[0], zmq.ZMQError) and loop.error is raised.value.exceptions[0]
