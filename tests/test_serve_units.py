"""The pieces of `rlpipe serve` that need no server process: the future store, the per-model
queue's seq_id order, tinker:// paths, the protobuf decoding of bad bodies, and the JSON
bodies (the SDK's own requests decode; bad ones are a 400 naming the field, in-process app)."""

import asyncio
import json
import subprocess

import numpy as np
import pytest

pytest.importorskip("tinker")
from tinker import types as T
from tinker._compat import model_dump
from tinker.proto import tinker_public_pb2 as pb

from rlpipe import types as rtypes
from rlpipe.serve import bodies, trainers, wire
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


def sdk_json(request) -> bytes:
    """A request body exactly as the SDK's resources send it."""
    return json.dumps(model_dump(request, exclude_unset=False, exclude_none=True, mode="json")).encode()


def test_the_sdks_own_requests_decode_with_every_field_kept_or_ignored():
    prompt = T.ModelInput.from_ints([3, 4, 5])
    sample = bodies.decode(sdk_json(T.SampleRequest(
        num_samples=2, prompt=prompt, sampling_params=T.SamplingParams(max_tokens=5, seed=1, stop=["\n"], temperature=0.7),
        sampling_session_id="s:sample:0", seq_id=3, prompt_logprobs=True, prompt_logprobs_last_n=2,
        record_stability_info=False)), bodies.Sample)
    assert sample.prompt == rtypes.ModelInput.from_ints([3, 4, 5]) and sample.num_samples == 2 and sample.seq_id == 3
    assert sample.sampling_params.params() == rtypes.SamplingParams(max_tokens=5, seed=1, stop=["\n"], temperature=0.7)
    assert sample.prompt_logprobs and sample.prompt_logprobs_last_n == 2 and sample.unsupported() == []
    create = bodies.decode(sdk_json(T.CreateModelRequest(
        session_id="s", model_seq_id=0, base_model="b", user_metadata={"k": "v"}, optimizer_config=T.AdamOptimizerConfig(),
        lora_config=T.LoraConfig(rank=8, seed=3, train_unembed=False))), bodies.CreateModel)
    assert create.lora_config.config() == rtypes.LoraConfig(rank=8, seed=3, train_unembed=False)
    assert create.user_metadata == {"k": "v"} and create.model_seq_id == 0
    adam = T.AdamParams(learning_rate=1e-3, beta2=0.99, grad_clip_norm=1.0)
    step = bodies.decode(sdk_json(T.OptimStepRequest(optim_params=adam, model_id="m", seq_id=4)), bodies.OptimStep)
    assert step.adam_params.params() == rtypes.AdamParams(learning_rate=1e-3, beta2=0.99, grad_clip_norm=1.0)
    load = bodies.decode(sdk_json(T.LoadWeightsRequest(
        session_id="s", model_seq_id=1, path="tinker://m/weights/a", optimizer=True, user_metadata={"k": "v"},
        optimizer_config=T.AdamOptimizerConfig(), weights_access_token="t", base_model="b")), bodies.LoadWeights)
    assert (load.session_id, load.model_seq_id, load.optimizer, load.model_id) == ("s", 1, True, None)
    save = bodies.decode(sdk_json(T.SaveWeightsForSamplerRequest(
        model_id="m", seq_id=5, sampling_session_seq_id=2, kind="snapshot", ttl_seconds=3600, user_metadata={"a": "b"})),
        bodies.SaveWeightsForSampler)
    assert (save.sampling_session_seq_id, save.ttl_seconds, save.path) == (2, 3600, None)
    more = [
        (T.CreateSessionRequest(tags=["t"], user_metadata={"k": 1}, sdk_version="0.38", project_id="p", display_name="d"),
         bodies.CreateSession, {"tags": ["t"], "user_metadata": {"k": 1}}),
        (T.SessionHeartbeatRequest(session_id="s"), bodies.SessionHeartbeat, {"session_id": "s"}),
        (T.FutureRetrieveRequest(request_id="r", allow_metadata_only=True), bodies.RetrieveFuture, {"request_id": "r"}),
        (T.GetInfoRequest(model_id="m"), bodies.ModelRef, {"model_id": "m"}),
        (T.UnloadModelRequest(model_id="m"), bodies.ModelRef, {"model_id": "m"}),
        (T.SaveWeightsRequest(model_id="m", path="p", seq_id=2, ttl_seconds=7200, overwrite=True, user_metadata={"a": "b"}),
         bodies.SaveWeights, {"path": "p", "ttl_seconds": 7200, "overwrite": True}),
        (T.SaveWeightsExternalRequest(model_id="m", path="p", seq_id=2, age_encryption_recipients=["age1x"]),
         bodies.SaveWeightsExternal, {"age_encryption_recipients": ["age1x"], "ttl_seconds": None}),
        (T.CreateSamplingSessionRequest(session_id="s", sampling_session_seq_id=0, model_path="tinker://m/sampler_weights/a"),
         bodies.CreateSamplingSession, {"model_path": "tinker://m/sampler_weights/a", "base_model": None}),
    ]
    for request, kind, want in more:
        got = bodies.decode(sdk_json(request), kind)
        assert {k: getattr(got, k) for k in want} == want, (request, got)
    # Bodies the SDK writes by hand: ServiceClient.close, the REST client's ttl and weights_info.
    assert bodies.decode(b'{"reason": {"type": "interrupted"}, "detail": null}', bodies.FinishSession).reason.type == "interrupted"
    assert bodies.decode(b'{"ttl_seconds": null}', bodies.SetTtl).ttl_seconds is None
    assert bodies.decode(b'{"tinker_path": "tinker://m/weights/a"}', bodies.WeightsInfo).tinker_path == "tinker://m/weights/a"


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    """The real app on an empty server: every body below is refused before any lookup."""
    from fastapi.testclient import TestClient

    from rlpipe.serve.app import Server, create_app

    with TestClient(create_app(Server({}, tmp_path_factory.mktemp("state")))) as client:
        yield client


PROMPT = {"chunks": [{"tokens": [1, 2], "type": "encoded_text"}]}
TTL_PATH = "/training_runs/m/checkpoints/weights/n/ttl"
BAD_BODIES = [  # (endpoint, body, what the error must name); per request type: wrong type, missing field, bound, enum
    ("/create_session", {"tags": "t"}, "`$.tags`"),
    ("/create_session", {"user_metadata": ["x"]}, "`$.user_metadata`"),
    ("/session_heartbeat", {}, "field `session_id`"),
    ("/session_heartbeat", {"session_id": 7}, "`$.session_id`"),
    ("/sessions/s/finish", {"reason": "done"}, "`$.reason`"),
    ("/sessions/s/finish", {"reason": {"type": "bored"}}, "`$.reason.type`"),
    ("/retrieve_future", {}, "field `request_id`"),
    ("/retrieve_future", {"request_id": ["r"]}, "`$.request_id`"),
    ("/create_model", {"session_id": "s", "model_seq_id": 0}, "field `base_model`"),
    ("/create_model", {"session_id": "s", "model_seq_id": "0", "base_model": "b"}, "`$.model_seq_id`"),
    ("/create_model", {"session_id": "s", "model_seq_id": -1, "base_model": "b"}, "`$.model_seq_id`"),
    ("/create_model", {"session_id": "s", "model_seq_id": 0, "base_model": "b", "lora_config": {"rank": 0}}, "`$.lora_config.rank`"),
    ("/create_model", {"session_id": "s", "model_seq_id": 0, "base_model": "b", "lora_config": {}}, "field `rank`"),
    ("/create_model", {"session_id": "s", "model_seq_id": 0, "base_model": "b", "lora_config": {"rank": 8, "train_mlp": "yes"}},
     "`$.lora_config.train_mlp`"),
    ("/create_model", {"session_id": "s", "model_seq_id": 0, "base_model": "b", "optimizer_config": {"type": "dimuon", "version": 1}},
     "`$.optimizer_config`"),
    ("/get_info", {}, "field `model_id`"),
    ("/unload_model", {"model_id": None}, "`$.model_id`"),
    ("/optim_step", {"model_id": "m"}, "field `seq_id`"),
    ("/optim_step", {"model_id": "m", "seq_id": 1, "adam_params": {"learning_rate": "fast"}}, "`$.adam_params.learning_rate`"),
    ("/optim_step", {"model_id": "m", "seq_id": 1, "adam_params": {"learning_rate": -1e-3}}, "`$.adam_params.learning_rate`"),
    ("/optim_step", {"model_id": "m", "seq_id": 1, "adam_params": {"beta1": 1.0}}, "`$.adam_params.beta1`"),
    ("/optim_step", {"model_id": "m", "seq_id": 1, "optimizer_params": {"type": "dimuon", "learning_rate": 0.1}}, "`$.optimizer_params`"),
    ("/save_weights", {"model_id": "m", "seq_id": 1}, "field `path`"),
    ("/save_weights", {"model_id": "m", "seq_id": 1, "path": "p", "ttl_seconds": "soon"}, "`$.ttl_seconds`"),
    ("/save_weights", {"model_id": "m", "seq_id": 1, "path": "p", "ttl_seconds": -5}, "`$.ttl_seconds`"),
    ("/save_weights", {"model_id": "m", "seq_id": 1, "path": "p", "overwrite": "yes"}, "`$.overwrite`"),
    ("/load_weights", {"optimizer": True}, "field `path`"),
    ("/load_weights", {"path": "tinker://m/weights/a", "optimizer": "yes"}, "`$.optimizer`"),
    ("/load_weights", {"path": "tinker://m/weights/a", "session_id": "s", "model_seq_id": -2}, "`$.model_seq_id`"),
    ("/save_weights_for_sampler", {"seq_id": 1, "path": "p"}, "field `model_id`"),
    ("/save_weights_for_sampler", {"model_id": "m", "seq_id": 1, "path": 3}, "`$.path`"),
    ("/save_weights_for_sampler", {"model_id": "m", "seq_id": 1, "sampling_session_seq_id": -1}, "`$.sampling_session_seq_id`"),
    ("/save_weights_external", {"model_id": "m", "seq_id": 1}, "field `path`"),
    ("/save_weights_external", {"model_id": "m", "seq_id": 1, "path": "p", "age_encryption_recipients": "age1x"},
     "`$.age_encryption_recipients`"),
    ("/save_weights_external", {"model_id": "m", "seq_id": 2**64, "path": "p"}, "`$.seq_id`"),
    ("/create_sampling_session", {"session_id": "s"}, "field `sampling_session_seq_id`"),
    ("/create_sampling_session", {"session_id": "s", "sampling_session_seq_id": 0, "base_model": 3}, "`$.base_model`"),
    ("/asample", {"sampling_session_id": "x"}, "field `prompt`"),
    ("/asample", {"prompt": PROMPT, "num_samples": 0}, "`$.num_samples`"),
    ("/asample", {"prompt": PROMPT, "num_samples": 4097}, "`$.num_samples`"),
    ("/asample", {"prompt": PROMPT, "prompt_logprobs_last_n": 0}, "`$.prompt_logprobs_last_n`"),
    ("/asample", {"prompt": {"chunks": [{"tokens": ["a"]}]}}, "`$.prompt.chunks[0].tokens[0]`"),
    ("/asample", {"prompt": {"chunks": [{"data": "", "format": "png", "type": "image"}]}}, "`$.prompt.chunks[0].type`"),
    ("/asample", {"prompt": PROMPT, "sampling_params": {"temperature": "hot"}}, "`$.sampling_params.temperature`"),
    ("/asample", {"prompt": PROMPT, "sampling_params": {"stop": [1.5]}}, "`$.sampling_params.stop[0]`"),
    (TTL_PATH, {"ttl_seconds": "a day"}, "`$.ttl_seconds`"),
    (TTL_PATH, {"ttl_seconds": 0}, "`$.ttl_seconds`"),
    ("/weights_info", {}, "field `tinker_path`"),
    ("/weights_info", {"tinker_path": 1}, "`$.tinker_path`"),
]


@pytest.mark.parametrize("path,body,names", BAD_BODIES, ids=[f"{p}:{n}" for p, _, n in BAD_BODIES])
def test_a_body_that_does_not_fit_is_a_400_naming_the_field(app, path, body, names):
    send = app.put if path == TTL_PATH else app.post
    r = send("/api/v1" + path, json=body)
    assert r.status_code == 400, r.text
    assert names in r.json()["error"] and r.json()["category"] == "user"


@pytest.mark.parametrize("body", [
    b'{"session_id": "s", "model_seq_id": 0, "base_model": "b", "user_metadata": {"k": ' + b"[" * 100_000 + b"]" * 100_000 + b"}}",
    b'{"session_id": "s", "model_seq_id": 0, "base_model": "b", "unknown": ' + b"{\"a\": " * 50_000 + b"1" + b"}" * 50_000 + b"}",
    b'{"session_id": "s", "model_seq_id": 0, "base_model": "b", "user_metadata": {"k": ' + b"[" * 100_000,  # and truncated
])
def test_a_deeply_nested_body_is_a_400(app, body):
    r = app.post("/api/v1/create_model", content=body, headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and "nested too deeply" in r.json()["error"], r.text


@pytest.mark.parametrize("body,says", [(b"{not json", "malformed JSON"), (b"\xff\xfe", "malformed JSON"), (b"", "malformed JSON"),
                                       (b"[1, 2]", "Expected `object`"), (b'"s"', "Expected `object`")])
def test_a_body_that_is_no_json_object_is_a_400(app, body, says):
    r = app.post("/api/v1/get_info", content=body, headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and says in r.json()["error"], r.text


def test_a_body_that_fits_goes_on_to_the_lookups(app):
    """Unknown fields pass (a newer SDK may send more); what follows is the server's own answer."""
    r = app.post("/api/v1/get_info", json={"model_id": "nobody:train:0", "type": "get_info", "future_field": [1]})
    assert r.status_code == 404 and "unknown model_id" in r.json()["error"]
    r = app.post("/api/v1/load_weights", json={"path": "tinker://m/weights/a", "optimizer": False})
    assert r.status_code == 400 and "no checkpoint" in r.json()["error"]
    r = app.get("/api/v1/training_runs", params={"limit": "many"})
    assert r.status_code == 400 and "limit" in r.json()["error"]
