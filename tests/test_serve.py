"""`rlpipe serve` driven by the official tinker SDK over real HTTP on loopback (no fakes on
either side): each primitive checked on its meaning, multi-tenancy, bad input, restart."""

import asyncio

import httpx
import numpy as np
import pytest
import zstandard

tinker = pytest.importorskip("tinker")
from tinker import types as T
from tinker.proto import tinker_public_pb2 as pb

from rlpipe import types as rtypes
from rlpipe.training.client import TrainingClient
from tests.learning import holds

pytestmark = pytest.mark.slow  # processes, engines or servers: not in the quick tier (pytest -m "not slow")

VOCAB = 300  # below the tiny model's vocabulary (336)
ADAM = T.AdamParams(learning_rate=1e-2, grad_clip_norm=1.0)


@pytest.fixture(scope="module")
def service(tinker_server):
    with tinker.ServiceClient() as svc:
        yield svc


def ready(maybe_future):
    """The SDK's create_* calls hand back a future (using it directly is deprecated)."""
    return maybe_future.result() if hasattr(maybe_future, "result") else maybe_future


def new_client(service, base, seed=0, rank=8):
    return service.create_lora_training_client(base_model=base, rank=rank, seed=seed).result()


def rl_datum(n, seed):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, VOCAB, n + 1)
    return T.Datum(
        model_input=T.ModelInput.from_ints(tokens[:-1].tolist()),
        loss_fn_inputs={"target_tokens": tokens[1:].astype(np.int64),
                        "logprobs": -rng.uniform(3.0, 8.0, n).astype(np.float32),
                        "advantages": rng.normal(size=n).astype(np.float32)},
    )


def sft_datum(tokens):
    return T.Datum(model_input=T.ModelInput.from_ints(tokens[:-1]),
                   loss_fn_inputs={"target_tokens": np.array(tokens[1:], dtype=np.int64),
                                   "weights": np.ones(len(tokens) - 1, dtype=np.float32)})


def logprobs_of(out) -> list[np.ndarray]:
    return [np.asarray(o["logprobs"].tolist(), dtype=np.float64) for o in out.loss_fn_outputs]


def inputs_of(datum, name) -> np.ndarray:
    return np.asarray(datum.loss_fn_inputs[name].tolist(), dtype=np.float64)


def formula(loss, lp, d, config):
    if loss == "cross_entropy":
        return -(inputs_of(d, "weights") * lp).sum()
    s, a = inputs_of(d, "logprobs"), inputs_of(d, "advantages")
    r = np.exp(lp - s)
    lo, hi = config.get("clip_low_threshold", 0.8), config.get("clip_high_threshold", 1.2)
    if loss == "importance_sampling":
        return -(r * a).sum()
    if loss == "ppo":
        return -np.minimum(r * a, np.clip(r, lo, hi) * a).sum()
    if loss == "cispo":
        return -(np.clip(r, lo, hi) * lp * a).sum()
    if loss == "dro":
        return -(lp * a - 0.5 * config["beta"] * (lp - s) ** 2).sum()
    raise AssertionError(loss)


def to_rlpipe(d: T.Datum) -> rtypes.Datum:
    return rtypes.Datum(model_input=rtypes.ModelInput.from_ints(d.model_input.to_ints()),
                        loss_fn_inputs={k: np.asarray(v.tolist()) for k, v in d.loss_fn_inputs.items()})


CASES = [("cross_entropy", {}), ("importance_sampling", {}), ("ppo", {"clip_low_threshold": 0.9, "clip_high_threshold": 1.1}),
         ("cispo", {"clip_low_threshold": 0.5, "clip_high_threshold": 2.0}), ("dro", {"beta": 0.1})]


def test_losses_equal_their_formulas_and_the_in_process_client(service, tiny_model_path, tmp_path):
    tc = new_client(service, tiny_model_path, seed=7)
    local = TrainingClient(tiny_model_path, rtypes.LoraConfig(rank=8, seed=7), tmp_path)
    rl = [rl_datum(n, seed) for n, seed in ((6, 1), (11, 2), (3, 3))]
    for loss, config in CASES:
        data = [sft_datum(list(range(5, 17)))] if loss == "cross_entropy" else rl
        remote = tc.forward(data, loss, config).result()
        mine = local.forward([to_rlpipe(d) for d in data], loss, config).result()
        want = sum(formula(loss, lp, d, config) for lp, d in zip(logprobs_of(remote), data))
        assert remote.metrics["loss:sum"] == pytest.approx(want, rel=1e-5, abs=1e-5), loss
        assert remote.metrics["loss:sum"] == pytest.approx(mine.metrics["loss:sum"], rel=1e-6, abs=1e-6), loss
        for a, b in zip(logprobs_of(remote), mine.loss_fn_outputs):
            # float32 rounding: a logprob of -12 is exact to about 1e-6 (two processes may sum in other orders)
            np.testing.assert_allclose(a, b["logprobs"].to_numpy(), rtol=1e-6, atol=1e-6)
    # The same step through the server and in process leaves the same weights.
    tc.forward_backward(rl, "ppo", dict(CASES[2][1])).result()
    tc.optim_step(ADAM).result()
    local.forward_backward([to_rlpipe(d) for d in rl], "ppo", dict(CASES[2][1])).result()
    local.optim_step(rtypes.AdamParams(learning_rate=1e-2, grad_clip_norm=1.0)).result()
    after_remote = logprobs_of(tc.forward(rl, "importance_sampling").result())
    after_local = local.forward([to_rlpipe(d) for d in rl], "importance_sampling").result().loss_fn_outputs
    for a, b in zip(after_remote, after_local):
        np.testing.assert_allclose(a, b["logprobs"].to_numpy(), rtol=0, atol=1e-5)
    local.close()


def test_forward_backward_custom_steps_like_the_in_process_client(service, tiny_model_path, tmp_path):
    import torch

    tc = new_client(service, tiny_model_path, seed=13)
    local = TrainingClient(tiny_model_path, rtypes.LoraConfig(rank=8, seed=13), tmp_path)
    data = [sft_datum(list(range(5, 17))), sft_datum(list(range(80, 90)))]

    def margin_loss(batch, logprobs):  # negative and positive token weights: -dL/dlp reaches the server as weights
        loss = sum(((lp * torch.linspace(-1.0, 2.0, len(lp))).sum() for lp in logprobs), torch.tensor(0.0))
        return -loss, {"margin:sum": float(loss)}

    remote = tc.forward_backward_custom(data, margin_loss).result()
    tc.optim_step(ADAM).result()
    mine = local.forward_backward_custom([to_rlpipe(d) for d in data], margin_loss).result()
    local.optim_step(rtypes.AdamParams(learning_rate=1e-2, grad_clip_norm=1.0)).result()
    assert remote.metrics["margin:sum"] == pytest.approx(mine.metrics["margin:sum"], rel=1e-5)
    after_remote = logprobs_of(tc.forward(data, "cross_entropy").result())
    after_local = local.forward([to_rlpipe(d) for d in data], "cross_entropy").result().loss_fn_outputs
    for a, b in zip(after_remote, after_local):
        np.testing.assert_allclose(a, b["logprobs"].to_numpy(), rtol=0, atol=1e-5)
    local.close()


@pytest.mark.learning
def test_training_lowers_the_loss(service, tiny_model_path, learning_seed):
    tc = new_client(service, tiny_model_path, seed=1 + learning_seed)
    data = [sft_datum(list(range(20, 40))), sft_datum(list(range(60, 75)))]
    first = tc.forward_backward(data, "cross_entropy").result().metrics["loss:sum"]
    for _ in range(8):
        tc.optim_step(ADAM)
        last = tc.forward_backward(data, "cross_entropy").result().metrics["loss:sum"]
    holds(last / first, "<", 0.7, "loss after 8 SFT steps through the SDK / before")


def test_load_state_restores_the_weights_exactly_and_create_from_state_keeps_the_optimizer(service, tiny_model_path):
    tc = new_client(service, tiny_model_path, seed=2)
    data = [sft_datum(list(range(30, 50)))]
    for _ in range(2):
        tc.forward_backward(data, "cross_entropy")
        tc.optim_step(ADAM)
    path = tc.save_state("two-steps").result().path
    assert path.startswith("tinker://") and "/weights/two-steps" in path
    saved = logprobs_of(tc.forward(data, "cross_entropy").result())
    tc.forward_backward(data, "cross_entropy")
    tc.optim_step(ADAM).result()
    third = logprobs_of(tc.forward(data, "cross_entropy").result())
    assert not np.array_equal(saved[0], third[0])
    tc.load_state(path).result()
    np.testing.assert_array_equal(logprobs_of(tc.forward(data, "cross_entropy").result())[0], saved[0])

    # With the optimizer state, a new client's next step is the original client's next step.
    resumed = ready(service.create_training_client_from_state_with_optimizer(path))
    resumed.forward_backward(data, "cross_entropy")
    resumed.optim_step(ADAM).result()
    np.testing.assert_allclose(logprobs_of(resumed.forward(data, "cross_entropy").result())[0], third[0], rtol=0, atol=1e-6)
    # Without it, Adam starts over and the step differs.
    fresh = ready(service.create_training_client_from_state(path))
    np.testing.assert_array_equal(logprobs_of(fresh.forward(data, "cross_entropy").result())[0], saved[0])
    fresh.forward_backward(data, "cross_entropy")
    fresh.optim_step(ADAM).result()
    assert np.abs(logprobs_of(fresh.forward(data, "cross_entropy").result())[0] - third[0]).max() > 1e-4


def test_sampling_logprobs_agree_with_forward(service, tiny_model_path):
    tc = new_client(service, tiny_model_path, seed=3)
    data = [sft_datum(list(range(40, 60)))]
    tc.forward_backward(data, "cross_entropy")
    tc.optim_step(ADAM).result()
    sc = ready(tc.save_weights_and_get_sampling_client())
    prompt = [40, 41, 42, 43, 44]
    params = T.SamplingParams(max_tokens=8, temperature=1.0, seed=11)
    out = sc.sample(T.ModelInput.from_ints(prompt), 4, params).result()
    assert len(out.sequences) == 4
    again = sc.sample(T.ModelInput.from_ints(prompt), 4, params).result()
    assert [s.tokens for s in again.sequences] == [s.tokens for s in out.sequences]  # seeded
    for seq in out.sequences:
        assert len(seq.logprobs) == len(seq.tokens) > 0
        full = prompt + list(seq.tokens)
        lp = logprobs_of(tc.forward([sft_datum(full)], "cross_entropy").result())[0][len(prompt) - 1:]
        np.testing.assert_allclose(seq.logprobs, lp, rtol=0, atol=1e-3)
    full = prompt + list(out.sequences[0].tokens)
    scored = sc.compute_logprobs(T.ModelInput.from_ints(full)).result()
    assert scored[0] is None
    lp = logprobs_of(tc.forward([sft_datum(full)], "cross_entropy").result())[0]
    np.testing.assert_allclose(np.array(scored[1:], dtype=np.float64), lp, rtol=0, atol=1e-3)
    last = sc.compute_logprobs(T.ModelInput.from_ints(full), prompt_logprobs_last_n=3).result()
    assert all(v is None for v in last[:-3]) and last[-3:] == pytest.approx(scored[-3:], abs=1e-5)
    # A named sampler checkpoint serves the same weights through create_sampling_client.
    named = tc.save_weights_for_sampler("named").result().path
    sc2 = ready(service.create_sampling_client(model_path=named))
    same = sc2.sample(T.ModelInput.from_ints(prompt), 4, params).result()
    assert [s.tokens for s in same.sequences] == [s.tokens for s in out.sequences]


def test_one_model_training_leaves_another_untouched(service, tiny_model_path):
    a = new_client(service, tiny_model_path, seed=4)
    b = new_client(service, tiny_model_path, seed=5)
    data = [sft_datum(list(range(10, 30)))]
    before = logprobs_of(b.forward(data, "cross_entropy").result())[0]

    async def interleave():
        for _ in range(3):
            fa = await a.forward_backward_async(data, "cross_entropy")
            fb = await b.forward_async(data, "cross_entropy")
            oa = await a.optim_step_async(ADAM)
            await fa, await oa
            np.testing.assert_array_equal(logprobs_of(await fb)[0], before)

    asyncio.run(interleave())
    assert np.abs(logprobs_of(a.forward(data, "cross_entropy").result())[0] - before).max() > 1e-3


def _post(server, path, **kwargs):
    return httpx.post(server.url + "/api/v1" + path, headers=server.headers() | kwargs.pop("headers", {}), timeout=30, **kwargs)


def _fwd_body(model_id, seq_id, tokens, loss="cross_entropy", weights=None):
    msg = pb.ForwardBackwardRequest(model_id=model_id, seq_id=seq_id, loss_fn=loss, forward_only=False)
    d = msg.data.add()
    d.model_input.add().encoded_text.tokens = np.asarray(tokens[:-1], dtype=np.int32).tobytes()
    target = d.loss_fn_inputs["target_tokens"]
    target.dense, target.dtype, target.shape[:] = np.asarray(tokens[1:], dtype=np.int64).tobytes(), pb.DTYPE_INT64, [len(tokens) - 1]
    w = d.loss_fn_inputs["weights"]
    values = np.ones(len(tokens) - 1, dtype=np.float32) if weights is None else np.asarray(weights, dtype=np.float32)
    w.dense, w.dtype, w.shape[:] = values.tobytes(), pb.DTYPE_FLOAT32, [len(values)]
    return msg.SerializeToString()


def _sparse_body(model_id):
    """A sparse CSR tensor whose dense form would take terabytes."""
    msg = pb.ForwardBackwardRequest(model_id=model_id, seq_id=97, loss_fn="cross_entropy")
    d = msg.data.add()
    d.model_input.add().encoded_text.tokens = np.arange(3, dtype=np.int32).tobytes()
    t = d.loss_fn_inputs["target_tokens"]
    t.dtype, t.shape[:] = pb.DTYPE_INT64, [1, 2**40]
    t.sparse_csr.crow_indices = np.zeros(2, dtype=np.int64).tobytes()
    return msg.SerializeToString()


def test_bad_input_gets_4xx_or_a_user_error_and_the_server_goes_on(tinker_server, service, tiny_model_path):
    a = new_client(service, tiny_model_path, seed=6)
    b = new_client(service, tiny_model_path, seed=8)
    data = [sft_datum(list(range(10, 20)))]
    session = a.model_id.split(":train:")[0]
    # HTTP-level refusals, each with a JSON body.
    cases = [
        ("/create_model", dict(content=b"{not json", headers={"Content-Type": "application/json"}), 400),
        ("/create_model", dict(json={"session_id": "s", "model_seq_id": 0, "base_model": tiny_model_path}), 404),
        ("/create_model", dict(json={"session_id": session, "model_seq_id": 99, "base_model": "no/such-model"}), 400),
        ("/forward_backward", dict(content=b"\xff\x00garbage", headers={"Content-Type": "application/x-protobuf"}), 400),
        ("/forward_backward", dict(content=_fwd_body("nobody:train:0", 1, [1, 2, 3])), 404),
        ("/get_info", dict(json={"model_id": "nobody:train:0"}), 404),
        ("/optim_step", dict(json={"model_id": a.model_id, "seq_id": 99, "adam_params": {"learning_rate": "fast"}}), 400),
        ("/asample", dict(json={"sampling_session_id": "nope", "prompt": {"chunks": []}}), 404),
        ("/retrieve_future", dict(json={"request_id": "nope"}), 404),
        ("/forward_backward", dict(content=b"x" * (17 << 20)), 413),
        # 20 MB of zeros compress to a few hundred bytes: the limit holds after decompression.
        ("/forward_backward", dict(content=zstandard.ZstdCompressor().compress(bytes(20 << 20)),
                                   headers={"Content-Encoding": "zstd"}), 413),
        ("/forward_backward", dict(content=_sparse_body(a.model_id)), 400),
        ("/optim_step", dict(json={"model_id": a.model_id, "seq_id": 98, "optimizer_params": ["adamw"]}), 400),
        ("/save_weights", dict(json={"model_id": a.model_id, "seq_id": 96, "path": "x", "ttl_seconds": "soon"}), 400),
        ("/create_model", dict(json={"session_id": session, "model_seq_id": 98, "base_model": tiny_model_path,
                                     "lora_config": {"rank": 64}}), 400),  # over the sampler's max_lora_rank
        ("/asample", dict(json={"sampling_session_id": "nope", "prompt": {"chunks": []}, "target_prompt_logprobs": {}}), 404),
    ]
    for path, kwargs, status in cases:
        r = _post(tinker_server, path, **kwargs)
        assert r.status_code == status, (path, r.status_code, r.text)
        assert "error" in r.json()
    def chunked():  # no Content-Length: the limit is enforced while reading
        for _ in range(18):
            yield b"x" * (1 << 20)

    r = _post(tinker_server, "/forward_backward", content=chunked())
    assert r.status_code == 413 and "error" in r.json()
    for headers in ({"X-API-Key": "tml-wrong"}, {}):
        r = httpx.post(tinker_server.url + "/api/v1/create_session", json={}, headers=headers, timeout=10)
        assert r.status_code == 401 and "error" in r.json()
    # Inputs the model cannot take: futures that fail with category "user".
    oov = [sft_datum([1, 2, 10_000, 3])]
    nan = rl_datum(5, 9)
    nan.loss_fn_inputs["advantages"] = T.TensorData.from_numpy(np.array([0.1, np.nan, 0.2, 0.3, 0.4], dtype=np.float32))
    for bad, loss in ((oov, "cross_entropy"), ([nan], "importance_sampling"), (data, "no_such_loss")):
        with pytest.raises(tinker.RequestFailedError) as err:
            a.forward_backward(bad, loss).result()
        assert err.value.category == "user"
    with pytest.raises(tinker.RequestFailedError):
        a.forward(data, "ppo", {"clip_low_threshold": 2.0, "clip_high_threshold": 1.0}).result()
    # Neither a's queue nor b's stopped.
    assert a.forward_backward(data, "cross_entropy").result().metrics["loss:sum"] > 0
    assert b.forward(data, "cross_entropy").result().metrics["loss:sum"] > 0
    assert tinker_server.alive()


ENDPOINTS = ["/client/config", "/create_session", "/session_heartbeat", "/create_model", "/get_info", "/forward_backward",
             "/optim_step", "/save_weights", "/load_weights", "/save_weights_for_sampler", "/save_weights_external",
             "/create_sampling_session", "/asample", "/retrieve_future", "/weights_info", "/unload_model"]


def test_garbage_to_every_endpoint_is_refused_and_the_server_lives(tinker_server):
    rng = np.random.default_rng(0)
    values = [None, 1, -1, 2**70, 1.5, float("nan"), "x", "", [], {}, [1, "a"], {"chunks": 3}, True]
    fields = ["model_id", "session_id", "seq_id", "model_seq_id", "path", "base_model", "request_id", "prompt",
              "num_samples", "sampling_params", "adam_params", "lora_config", "sampling_session_id", "tinker_path"]
    statuses = []
    for i in range(300):
        path = ENDPOINTS[i % len(ENDPOINTS)]
        if i % 3 == 0:
            kwargs = dict(content=rng.bytes(int(rng.integers(0, 200))))
        else:
            body = {f: values[int(rng.integers(len(values)))] for f in rng.choice(fields, size=int(rng.integers(0, 6)))}
            kwargs = dict(content=__import__("json").dumps(body).encode(), headers={"Content-Type": "application/json"})
        r = _post(tinker_server, path, **kwargs)
        statuses.append(r.status_code)
        assert r.status_code < 500, (path, kwargs, r.text)
        if r.status_code >= 400:
            assert r.json()
    assert statuses.count(200) < len(statuses)
    assert tinker_server.alive()
    assert httpx.get(tinker_server.url + "/api/v1/healthz", headers=tinker_server.headers()).json() == {"status": "ok"}


def test_finishing_a_session_frees_its_models_and_keeps_their_checkpoints(tinker_server, tiny_model_path):
    with tinker.ServiceClient() as svc:
        tc = new_client(svc, tiny_model_path, seed=14)
        path = tc.save_state("kept").result().path
    r = _post(tinker_server, "/get_info", json={"model_id": tc.model_id})
    assert r.status_code == 404 and "no longer loaded" in r.json()["error"]
    session = tc.model_id.split(":train:")[0]
    r = _post(tinker_server, "/create_model", json={"session_id": session, "model_seq_id": 5, "base_model": tiny_model_path})
    assert r.status_code == 400 and "finished" in r.json()["error"]
    with tinker.ServiceClient() as svc:
        resumed = ready(svc.create_training_client_from_state(path))
        assert resumed.get_info().model_data.model_name == tiny_model_path


def test_a_retried_request_runs_once(tinker_server, service, tiny_model_path):
    a = new_client(service, tiny_model_path, seed=9)
    body = _fwd_body(a.model_id, 1, list(range(10, 20)))
    first = _post(tinker_server, "/forward_backward", content=body, headers={"Content-Type": "application/x-protobuf"}).json()
    again = _post(tinker_server, "/forward_backward", content=body, headers={"Content-Type": "application/x-protobuf"}).json()
    assert first["request_id"] == again["request_id"]
    r = _post(tinker_server, "/retrieve_future", json={"request_id": first["request_id"]}, headers={"Accept": "application/x-protobuf"})
    out = pb.ForwardBackwardOutput()
    out.ParseFromString(r.content)
    assert out.metrics["loss:sum"] > 0


def test_rest_checkpoints_external_weights_and_delete(service, tiny_model_path, tmp_path):
    import urllib.request

    tc = service.create_lora_training_client(base_model=tiny_model_path, rank=8, seed=10, train_mlp=False,
                                             user_metadata={"renderer_name": "role_colon"}).result()
    tc.save_state("kept").result()
    ext = tc.save_weights_external("export").result().path
    rest = service.create_rest_client()
    urls = rest.get_external_weights_urls(ext).result().urls
    assert set(urls) == {"adapter_config.json", "adapter_model.safetensors"}
    for name, url in urls.items():
        urllib.request.urlretrieve(url, tmp_path / name)
    from peft import PeftConfig

    assert PeftConfig.from_pretrained(str(tmp_path)).r == 8
    info = rest.get_weights_info_by_tinker_path(ext).result()
    assert info.base_model == tiny_model_path and info.lora_rank == 8 and info.train_mlp is False and info.train_attn
    assert rest.get_training_run(tc.model_id).result().user_metadata == {"renderer_name": "role_colon"}
    listed = {c.checkpoint_id for c in rest.list_checkpoints(tc.model_id).result().checkpoints}
    assert listed == {"weights/kept", "external_weights/export"}
    # The cookbook's download of a training checkpoint: an age-encrypted export, decrypted client side.
    weights = pytest.importorskip("tinker_cookbook.weights")
    got = weights.download(tinker_path=tc.save_state("for-download").result().path, output_dir=str(tmp_path / "dl"))
    assert PeftConfig.from_pretrained(got).r == 8
    rest.delete_checkpoint_from_tinker_path(ext).result()
    listed = {c.checkpoint_id for c in rest.list_checkpoints(tc.model_id).result().checkpoints}
    assert listed == {"weights/kept", "weights/for-download"}


def test_a_restarted_server_still_serves_its_paths(tinker_server, service, tiny_model_path):
    """Last in this module: it restarts the session's server (same port, same state dir)."""
    tc = new_client(service, tiny_model_path, seed=12)
    data = [sft_datum(list(range(50, 70)))]
    tc.forward_backward(data, "cross_entropy")
    tc.optim_step(ADAM).result()
    state = tc.save_state("before-restart").result().path
    sampler = tc.save_weights_for_sampler("before-restart").result().path
    want = logprobs_of(tc.forward(data, "cross_entropy").result())[0]
    params = T.SamplingParams(max_tokens=6, temperature=1.0, seed=3)
    tokens = [s.tokens for s in ready(service.create_sampling_client(model_path=sampler)).sample(
        T.ModelInput.from_ints([50, 51, 52]), 2, params).result().sequences]

    assert tinker_server.stop() == []  # its vLLM engine went with it
    tinker_server.start()
    with tinker.ServiceClient() as svc:
        again = ready(svc.create_sampling_client(model_path=sampler)).sample(T.ModelInput.from_ints([50, 51, 52]), 2, params).result()
        assert [s.tokens for s in again.sequences] == tokens
        resumed = ready(svc.create_training_client_from_state_with_optimizer(state))
        np.testing.assert_array_equal(logprobs_of(resumed.forward(data, "cross_entropy").result())[0], want)
        rest = svc.create_rest_client()
        assert rest.get_training_run(tc.model_id).result().training_run_id == tc.model_id
        paths = {c.tinker_path for c in rest.list_checkpoints(tc.model_id).result().checkpoints}
        assert {state, sampler} <= paths
        r = _post(tinker_server, "/get_info", json={"model_id": tc.model_id})
        assert r.status_code == 404 and "create_training_client_from_state" in r.json()["error"]


def test_the_local_sampler_and_no_api_key(tiny_model_path, tmp_path):
    """`--sampler local` (no vLLM) and a server without --api-key (any tml- key is taken)."""
    from tests.serve_helpers import ServeProcess

    server = ServeProcess(tiny_model_path, tmp_path / "state", "--sampler", "local", api_key=None)
    server.start()
    try:
        with tinker.ServiceClient(base_url=server.url, api_key="tml-anything") as svc:
            tc = new_client(svc, tiny_model_path, seed=15, rank=4)
            sc = ready(tc.save_weights_and_get_sampling_client())
            out = sc.sample(T.ModelInput.from_ints([5, 6, 7]), 2, T.SamplingParams(max_tokens=5, seed=1)).result()
            for seq in out.sequences:
                full = [5, 6, 7] + list(seq.tokens)
                lp = logprobs_of(tc.forward([sft_datum(full)], "cross_entropy").result())[0][2:]
                np.testing.assert_allclose(seq.logprobs, lp, rtol=0, atol=1e-3)
    finally:
        assert server.stop() == []
