"""How many 4k-token groups per second the buffer accepts, by store: the hand-written CRC log
(the buffer's store until issue 11) extended with an in-memory id set for deduplication, and
SQLite in WAL mode (what the buffer uses now, rlpipe/pipeline/store.py).

    python benchmarks/bench_buffer_store.py [--groups 3000] [--trajectories 16] [--tokens 256] [--dir /tmp]

Every figure covers what accepting a group costs: decoding the frame as received, validating
it (token ids, masks, logprobs, versions), deduplicating its id and storing it durably.

  crc-log     length + CRC32 + record appended per group, flushed to the OS at once; fsync once
              per round of 64 (what a power cut can take: the round being written).
  sqlite      the real ExperienceBuffer: examine_frame() + decide() per round of 64 frames, as
              serve() does. synchronous=FULL fsyncs the WAL at every commit: an acknowledged
              group survives a power cut. NORMAL survives a killed process only.
  serve/tcp   the whole role: serve() in its own process, one DEALER keeping 256 groups in
              flight and counting the GroupAcks (sockets, acks, the batch socket's polling and
              the start of the process included).
The acceptance bar of issue 11 is 2k groups/s with 4k-token groups on this machine.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import struct
import tempfile
import time
import zlib
from pathlib import Path

import msgspec
import numpy as np
import zmq

from rlpipe.pipeline.buffer import ExperienceBuffer, serve
from rlpipe.pipeline.transport import Codec, RequestClient, tcp_address
from rlpipe.pipeline.validation import checked_decoder, why_dropped
from rlpipe.types import GroupAck, Shutdown, Trajectory, TrajectoryGroup

VOCAB = 32000
ROUND = 64


def make_frames(n: int, trajectories: int, tokens: int, seed: int = 0, prefix: str = "e0") -> list[bytes]:
    """n encoded groups with distinct ids: a quarter prompt tokens, the rest sampled actions."""
    rng = np.random.default_rng(seed)
    encoder = msgspec.msgpack.Encoder()
    prompt = tokens // 4
    templates = []
    for _ in range(8):  # a few distinct payloads, reused with new ids (building them is slow)
        trajs = [Trajectory(tokens=rng.integers(0, VOCAB, tokens).tolist(),
                            action_mask=[0] * prompt + [1] * (tokens - prompt),
                            sampling_logprobs=[0.0] * prompt + (-rng.exponential(1.0, tokens - prompt)).tolist(),
                            policy_versions=[-1] * prompt + [3] * (tokens - prompt),
                            reward=float(i % 2), advantage=float(i % 2) - 0.5, stop_reason="stop")
                 for i in range(trajectories)]
        templates.append(TrajectoryGroup(group_id="", trajectories=trajs, explorer_id="e0", run_id="bench",
                                         incarnation=1))
    return [encoder.encode(msgspec.structs.replace(templates[i % 8], group_id=f"{prefix}-{i:08d}")) for i in range(n)]


def crc_log(frames: list[bytes], directory: Path) -> None:
    """The previous store's append path, plus the id set deduplication would need."""
    decoder, header, seen = checked_decoder(VOCAB), struct.Struct("<II"), set()
    seq = 0
    with open(directory / "experience.log", "ab") as f:
        for start in range(0, len(frames), ROUND):
            for frame in frames[start:start + ROUND]:
                group = decoder.decode(frame)
                why_dropped(group, None, False)  # the validation serve() does
                if group.group_id in seen:
                    continue
                seen.add(group.group_id)
                seq += 1
                record = seq.to_bytes(8, "little") + frame
                f.write(header.pack(len(record), zlib.crc32(record)) + record)
                f.flush()  # into the OS at once: a killed process loses nothing
            os.fsync(f.fileno())


def sqlite(frames: list[bytes], directory: Path, synchronous: str, per_round: int) -> None:
    buf = ExperienceBuffer(directory, vocab_size=VOCAB, run_id="bench", synchronous=synchronous)
    codec = Codec(64 << 20, buf.reject)
    try:
        for start in range(0, len(frames), per_round):
            outcomes = buf.decide([buf.examine_frame(f, codec) for f in frames[start:start + per_round]])
            assert outcomes[-1] == "accepted", outcomes[-1]
    finally:
        buf.close()


def serve_tcp(frames: list[bytes], directory: Path, window: int = 256) -> float:
    """The role in its own process (as `rlpipe buffer` runs it), fed by one DEALER here."""
    exp, batches = tcp_address(), tcp_address()
    role = multiprocessing.get_context("spawn").Process(
        target=serve, args=(directory, exp, batches), kwargs={"vocab_size": VOCAB, "run_id": "bench"})
    role.start()
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.connect(exp)  # queued until the role is up: no READY needed
    decoder = msgspec.msgpack.Decoder(GroupAck)
    # A first group answered means the process is up: its start is not the buffer's speed.
    sock.send_multipart([b"warm-up", make_frames(1, 1, 8, prefix="warm-up")[0]])
    assert sock.poll(60_000), "the buffer process did not start"
    sock.recv_multipart()
    start = time.perf_counter()
    sent = acked = 0
    deadline = time.monotonic() + 600
    while acked < len(frames) and time.monotonic() < deadline:
        while sent < len(frames) and sent - acked < window:
            sock.send_multipart([sent.to_bytes(8, "little"), frames[sent]])
            sent += 1
        if sock.poll(1000):
            _, reply = sock.recv_multipart()
            assert decoder.decode(reply).outcome == "accepted"
            acked += 1
    elapsed = time.perf_counter() - start
    sock.close(linger=0)
    with RequestClient(batches) as learner:
        learner.request(Shutdown(reason="benchmark done"), timeout_s=30)
    role.join(30)
    assert acked == len(frames), f"only {acked} of {len(frames)} acknowledged"
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--groups", type=int, default=3000)
    parser.add_argument("--trajectories", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=256, help="tokens per trajectory")
    parser.add_argument("--dir", default=None, help="where the stores are written (default: the temp dir)")
    args = parser.parse_args()
    frames = make_frames(args.groups, args.trajectories, args.tokens)
    mb = sum(map(len, frames)) / 1e6
    print(f"{args.groups} groups of {args.trajectories} x {args.tokens} tokens, {len(frames[0]) / 1e3:.0f} KB each")

    decoder = checked_decoder(VOCAB)
    cases = {
        "decode + validate only": lambda d: [why_dropped(decoder.decode(f), None, False) for f in frames],
        "crc-log, flush each, fsync/round": lambda d: crc_log(frames, d),
        "sqlite WAL, NORMAL, commit/round": lambda d: sqlite(frames, d, "NORMAL", ROUND),
        "sqlite WAL, FULL, commit/group": lambda d: sqlite(frames, d, "FULL", 1),
        "sqlite WAL, FULL, commit/round (chosen)": lambda d: sqlite(frames, d, "FULL", ROUND),
        "serve() over tcp, FULL (chosen)": lambda d: serve_tcp(frames, d),
    }
    print(f"{'':42s} {'groups/s':>9s} {'MB/s':>7s} {'us/group':>9s}")
    for name, run in cases.items():
        with tempfile.TemporaryDirectory(dir=args.dir) as d:
            start = time.perf_counter()
            measured = run(Path(d))  # seconds, where a case times itself
            elapsed = measured if isinstance(measured, float) else time.perf_counter() - start
        print(f"{name:42s} {args.groups / elapsed:9.0f} {mb / elapsed:7.1f} {elapsed / args.groups * 1e6:9.0f}", flush=True)


if __name__ == "__main__":
    main()
