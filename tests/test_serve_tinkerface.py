"""Tinker 0.38's in-flight sampling clients and stable_reinforce, driven by the official tinker
SDK against a real `rlpipe serve` process (the local sampler: the semantics under test live in
the server's sampling sessions, the same for vLLM)."""

import numpy as np
import pytest

tinker = pytest.importorskip("tinker")
from tinker import types as T

from tests.serve_helpers import ServeProcess

pytestmark = pytest.mark.slow  # a server process

ADAM = T.AdamParams(learning_rate=5e-2, grad_clip_norm=1.0)
PROMPT = [40, 41, 42, 43, 44]


@pytest.fixture(scope="module")
def server(tiny_model_path, tmp_path_factory):
    server = ServeProcess(tiny_model_path, tmp_path_factory.mktemp("tinkerface") / "state", "--sampler", "local")
    server.start()
    yield server
    assert server.stop() == []


@pytest.fixture(scope="module")
def service(server):
    with tinker.ServiceClient(base_url=server.url, api_key=server.api_key) as svc:
        yield svc


def sft_datum(tokens):
    return T.Datum(model_input=T.ModelInput.from_ints(tokens[:-1]),
                   loss_fn_inputs={"target_tokens": np.array(tokens[1:], dtype=np.int64),
                                   "weights": np.ones(len(tokens) - 1, dtype=np.float32)})


def train(tc, steps=3):
    data = [sft_datum(list(range(100, 130)))]
    for _ in range(steps):
        tc.forward_backward(data, "cross_entropy")
        tc.optim_step(ADAM)
    tc.optim_step(ADAM).result()


def scored(sc, tokens):
    return np.array(sc.compute_logprobs(T.ModelInput.from_ints(tokens)).result()[1:], dtype=np.float64)


def test_inflight_clients_share_one_target_that_each_save_moves(service, tiny_model_path):
    tc = service.create_lora_training_client(base_model=tiny_model_path, rank=8, seed=21).result()
    train(tc, 1)
    full = PROMPT + list(range(100, 112))
    sc_a = tc.save_weights_and_get_sampling_client(kind="inflight").result()
    snap = tc.save_weights_and_get_sampling_client().result()  # the same weights, frozen
    before = scored(sc_a, full)
    np.testing.assert_allclose(before, scored(snap, full), rtol=0, atol=1e-6)
    # A long sample started before the next save: it runs wholly on one set of weights.
    long_sample = sc_a.sample(T.ModelInput.from_ints(PROMPT), 1, T.SamplingParams(max_tokens=64, seed=5))

    train(tc, 3)
    sc_b = tc.save_weights_and_get_sampling_client(kind="inflight").result()
    after = scored(sc_b, full)
    assert np.abs(after - before).max() > 1e-2  # training moved the weights
    # The older in-flight client sees the new save, the snapshot does not.
    np.testing.assert_allclose(scored(sc_a, full), after, rtol=0, atol=1e-6)
    np.testing.assert_allclose(scored(snap, full), before, rtol=0, atol=1e-6)
    # ... and the new weights are the trained ones.
    fwd = tc.forward([sft_datum(full)], "cross_entropy").result().loss_fn_outputs[0]["logprobs"].tolist()
    np.testing.assert_allclose(after, fwd, rtol=0, atol=1e-3)

    seq = long_sample.result(timeout=120).sequences[0]
    sampled = PROMPT + list(seq.tokens)
    old, new = scored(snap, sampled)[len(PROMPT) - 1:], scored(sc_b, sampled)[len(PROMPT) - 1:]
    gaps = [np.abs(np.asarray(seq.logprobs) - ref).max() for ref in (old, new)]
    assert min(gaps) < 1e-3, f"the sample ran on neither the old nor the new weights: {gaps}"


def rl_datum(seq, advantage: float) -> T.Datum:
    """As tinker_cookbook's rl_loop builds it: prompt + all but the last sampled token in,
    targets shifted by one with placeholders on the prompt, provenance naming the sequence."""
    tokens = list(seq.tokens)
    ob = len(PROMPT) - 1
    datum = T.Datum(
        model_input=T.ModelInput.from_ints(PROMPT + tokens[:-1]),
        loss_fn_inputs={"target_tokens": np.array([0] * ob + tokens, dtype=np.int64),
                        "logprobs": np.array([0.0] * ob + list(seq.logprobs), dtype=np.float32),
                        "advantages": np.array([0.0] * ob + [advantage] * len(tokens), dtype=np.float32)})
    return datum.with_provenance(
        model_input=[T.PromptProvenanceSpan(sequence_id=seq.sequence_id, length=len(PROMPT)),
                     T.SampledProvenanceSpan(sequence_id=seq.sequence_id, length=len(tokens) - 1)],
        loss_fn_inputs=[T.PromptProvenanceSpan(sequence_id=seq.sequence_id, offset=1, length=ob),
                        T.SampledProvenanceSpan(sequence_id=seq.sequence_id, length=len(tokens))])


def test_stable_reinforce_trains_on_recorded_sequences(service, tiny_model_path):
    tc = service.create_lora_training_client(base_model=tiny_model_path, rank=8, seed=22).result()
    sc = tc.save_weights_and_get_sampling_client(record_stability_info=True).result()
    out = sc.sample(T.ModelInput.from_ints(PROMPT), 4, T.SamplingParams(max_tokens=12, seed=3)).result()
    seqs = [s for s in out.sequences if len(s.tokens) >= 2]
    assert len(seqs) >= 2
    data = [rl_datum(s, 1.0 if i % 2 == 0 else -1.0) for i, s in enumerate(seqs)]

    result = tc.forward_backward(data, "stable_reinforce", {"kl_coeff": 0.01}).result()
    m = result.metrics
    assert m["stability_sequences:sum"] == len(seqs)
    assert m["stability_version_lag:max"] == 0.0  # sampled with the weights being trained
    assert m["ratio:mean"] == pytest.approx(1.0, abs=1e-2)  # on policy
    assert m["tokens:sum"] == sum(len(s.tokens) for s in seqs)  # the sampled tokens only
    assert "ratio_capped_frac:mean" in m and "loss:sum" in m
    for row, seq in zip(result.loss_fn_outputs, seqs):
        np.testing.assert_allclose(row["sampling_logprobs"].tolist()[len(PROMPT) - 1:], seq.logprobs, atol=1e-6)

    before = [o["logprobs"].tolist() for o in result.loss_fn_outputs]
    tc.optim_step(T.AdamParams(learning_rate=1e-3)).result()  # small: first order holds
    again = tc.forward_backward(data, "stable_reinforce").result()
    after = [o["logprobs"].tolist() for o in again.loss_fn_outputs]
    assert max(np.abs(np.subtract(a, b)).max() for a, b in zip(after, before)) > 1e-3  # the step moved the weights
    assert again.metrics["stability_version_lag:max"] == 1.0  # one step past the sampler's weights
    # The step followed the advantages: sum over sequences of A * (sum of sampled-token logprobs) rose.
    def objective(lps):
        return sum((1.0 if i % 2 == 0 else -1.0) * np.sum(lp[len(PROMPT) - 1:]) for i, lp in enumerate(lps))
    assert objective(after) > objective(before)

    # Without provenance, or naming tokens the sequence did not sample: refused, clearly.
    bare = T.Datum(model_input=data[0].model_input, loss_fn_inputs=data[0].loss_fn_inputs)
    with pytest.raises(tinker.RequestFailedError, match="provenance"):
        tc.forward_backward([bare], "stable_reinforce").result()
    targets = np.array(data[0].loss_fn_inputs["target_tokens"].tolist(), dtype=np.int64)
    targets[-1] = (targets[-1] + 1) % 300
    wrong = T.Datum(model_input=data[0].model_input,
                    loss_fn_inputs=dict(data[0].loss_fn_inputs, target_tokens=targets)).with_provenance(
        model_input=data[0].model_input_spans, loss_fn_inputs=data[0].loss_fn_input_spans)
    with pytest.raises(tinker.RequestFailedError, match="not the tokens sequence"):
        tc.forward_backward([wrong], "stable_reinforce").result()


def test_the_pipelines_tinker_backend_publishes_and_samples_inflight(server, tiny_model_path, tmp_path):
    """explorer.weight_updates = "inflight": the learner's publish() hands out its in-flight
    client's sampler handle, the explorer samples through it, and a later publish reaches the
    explorer's existing client. The run config is a stand-in (types.SimpleNamespace) with the
    fields these two classes read, as the config field lives on another branch."""
    import asyncio
    import types

    from rlpipe.pipeline.tinker.backend import inflight_handle
    from rlpipe.pipeline.tinker.sampler import TinkerEndpoint
    from rlpipe.pipeline.tinker.training import TinkerTrainingClient
    from rlpipe.types import AdamParams, Datum, LoraConfig, ModelInput, SamplingParams, TensorData

    config = types.SimpleNamespace(
        model_path=lambda: tiny_model_path, tinker_base_url=server.url, tinker_api_key=server.api_key, tinker_timeout_s=120.0, max_staleness=1,
        explorer=types.SimpleNamespace(weight_updates="inflight", max_tokens=8),
        learner=types.SimpleNamespace(keep_checkpoints=2))
    learner = TinkerTrainingClient(config, LoraConfig(rank=8, seed=23), tmp_path)
    first = learner.publish(1).result()
    assert inflight_handle(first["sampler_path"])
    explorer = TinkerEndpoint(config, name="explorer-0", request_timeout_s=60.0, max_restarts=0)
    client = asyncio.run(explorer._new_client(first["sampler_path"], 1, "from the handle"))
    out = asyncio.run(client.sample_async(ModelInput.from_ints(PROMPT), 2, SamplingParams(max_tokens=6, seed=1)))
    assert len(out.sequences) == 2 and all(s.policy_version == 1 for s in out.sequences)
    full = PROMPT + list(range(100, 112))
    before = scored(client.client, full)

    tokens = list(range(100, 130))
    datum = Datum(model_input=ModelInput.from_ints(tokens[:-1]), loss_fn_inputs={
        "target_tokens": TensorData(data=tokens[1:], dtype="int64"),
        "weights": TensorData(data=[1.0] * (len(tokens) - 1), dtype="float32")})
    for _ in range(3):
        learner.forward_backward([datum], "cross_entropy").result()
        learner.optim_step(AdamParams(learning_rate=5e-2)).result()
    second = learner.publish(2).result()
    newer = TinkerEndpoint(config, name="explorer-1", request_timeout_s=60.0, max_restarts=0)
    fresh = asyncio.run(newer._new_client(second["sampler_path"], 2, "from the handle"))
    after = scored(fresh.client, full)
    assert np.abs(after - before).max() > 1e-2
    np.testing.assert_allclose(scored(client.client, full), after, rtol=0, atol=1e-6)  # the old client moved too
