"""Malformed frames against every socket a role binds, over real sockets: the buffer's serve()
and the learner's ControlServer. benchmarks/fuzz.py sends 10,000 per socket; this sends 500."""

from benchmarks.fuzz import KINDS, SOCKETS, run

FRAMES = 500


def test_malformed_frames_crash_nothing_and_are_all_counted(tmp_path):
    out = run(FRAMES, seed=1, buffer_dir=tmp_path / "buffer")  # also checks each socket serves afterwards
    assert out["crashes"] == 0, out["errors"]
    for socket in SOCKETS:
        tally = out[socket]
        assert set(tally["kinds"]) == set(KINDS), tally["kinds"]
        assert sum(tally["rejected"].values()) + tally["groups"] == FRAMES, (socket, tally)
    experience, batches, control = (out[s] for s in SOCKETS)
    # Well-formed groups with bad values or another run's id are groups: dropped and acknowledged.
    assert sum(experience["acks"].values()) == experience["groups"] > 0
    assert set(experience["acks"]) == {"invalid", "other_run"}
    assert experience["acks"]["other_run"] == experience["kinds"]["foreign"]
    for reasons in (experience["rejected"], batches["rejected"], control["rejected"]):
        assert {"not_msgpack", "schema", "unknown_tag", "unexpected", "framing", "oversize"} <= set(reasons), reasons
    # another run's BatchRequests (told why, with a Shutdown reply) and another run's Shutdowns
    assert batches["groups"] == 0 and batches["rejected"]["other_run"] > batches["kinds"]["foreign"]
    assert control["groups"] == control["kinds"]["foreign"]  # NaN-time heartbeats: odd, handled
    assert experience["max_batch_latency_s"] < 2.0  # the flood did not starve the learner
