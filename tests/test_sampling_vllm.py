"""The vLLM sampling backend on the tiny model: fidelity against the learner, LoRA hot-swap,
prefix-cache isolation, stops and seeds, bad input, timeouts and a dead engine.

One engine serves the whole session (the vllm_engine fixture); a second, private one is
started only to be killed in test_dead_engine_is_reported."""

import os
import signal
import time

import numpy as np
import pytest

pytest.importorskip("vllm", reason="vLLM is not installed: vLLM sampling tests skipped")

from rlpipe import ServiceClient, types  # noqa: E402
from rlpipe.sampling import (  # noqa: E402
    AdapterEvictedError,
    EngineDeadError,
    SamplingTimeout,
    create_sampling_client,
)
from rlpipe.types import ModelInput, SamplingParams  # noqa: E402

pytestmark = pytest.mark.slow  # processes, engines or servers: not in the quick tier (pytest -m "not slow")

PROMPT = [3, 40, 50, 60, 4]
TOL = 1e-3  # fp32 on both sides


def deltas(seqs, refs):
    d = np.concatenate([np.abs(np.asarray(s.logprobs) - np.asarray(r)) for s, r in zip(seqs, refs)])
    return float(d.mean()), float(d.max())


def learner_logprobs(tc, prompt, seqs, temperature):
    """TrainingClient.forward's logprobs of each sequence's tokens at the given temperature."""
    data = []
    for s in seqs:
        toks = prompt + s.tokens
        data.append(types.Datum(model_input=ModelInput.from_ints(toks[:-1]),
                                loss_fn_inputs={"target_tokens": toks[1:], "weights": [1.0] * (len(toks) - 1)}))
    out = tc.forward(data, "cross_entropy", {"temperature": temperature}).result()
    return [o["logprobs"].to_numpy()[len(prompt) - 1:] for o in out.loss_fn_outputs]


@pytest.fixture(scope="module")
def trainer(tiny_model_path, tmp_path_factory):
    """A LoRA TrainingClient on the tiny model (lm_head included, alpha 32, rank 8)."""
    service = ServiceClient(checkpoint_dir=tmp_path_factory.mktemp("ckpt"))
    tc = service.create_lora_training_client(base_model=tiny_model_path, rank=8, seed=0)
    yield tc
    tc.close()


TEXTS = ["<|user|>What is 12 + 7?<|end|><|assistant|>the answer 19<|end|>", "3 4 5 6 7 8", "the sum of 4 and 5 is 9"]


def train(tc, steps, lr=2e-2):
    """A few supervised steps: enough to move every LoRA weight well away from zero."""
    tokens = [tc.get_tokenizer()(t)["input_ids"] for t in TEXTS]
    data = [types.Datum(model_input=ModelInput.from_ints(t[:-1]),
                        loss_fn_inputs={"target_tokens": t[1:], "weights": [1.0] * (len(t) - 1)}) for t in tokens]
    for _ in range(steps):
        tc.forward_backward(data, "cross_entropy").result()
        tc.optim_step(types.AdamParams(learning_rate=lr)).result()


# --------------------------------------------------------------------------- fidelity and hot-swap


def test_logprob_fidelity_and_hot_swap(vllm_engine, tiny_model_path, trainer, reference_logprobs):
    prompt = ModelInput.from_ints(PROMPT)
    report = {}
    base = create_sampling_client(tiny_model_path)
    for T in (1.0, 0.7):  # fresh LoRA (B = 0): the learner is the base model
        seqs = base.sample(prompt, 8, SamplingParams(max_tokens=24, temperature=T, seed=1)).result().sequences
        report[f"base T={T}"] = deltas(seqs, learner_logprobs(trainer, PROMPT, seqs, T))

    train(trainer, 3)
    v1_dir = trainer.save_weights_for_sampler("v1").result().path
    v1 = create_sampling_client(tiny_model_path, v1_dir, policy_version=1)
    v1_seqs = {}
    for T in (1.0, 0.7):
        seqs = v1_seqs[T] = v1.sample(prompt, 8, SamplingParams(max_tokens=24, temperature=T, seed=1)).result().sequences
        assert all(s.policy_version == 1 for s in seqs)
        report[f"v1 T={T}"] = deltas(seqs, learner_logprobs(trainer, PROMPT, seqs, T))

    train(trainer, 3)
    v2_dir = trainer.save_weights_for_sampler("v2").result().path
    v2 = create_sampling_client(tiny_model_path, v2_dir, policy_version=2)
    for T in (1.0, 0.7):
        seqs = v2.sample(prompt, 8, SamplingParams(max_tokens=24, temperature=T, seed=1)).result().sequences
        assert all(s.policy_version == 2 for s in seqs)
        assert [s.tokens for s in seqs] != [s.tokens for s in v1_seqs[T]]  # new weights, new samples
        report[f"v2 T={T}"] = deltas(seqs, learner_logprobs(trainer, PROMPT, seqs, T))
    # the old version still serves its own weights next to the new one
    again = v1.sample(prompt, 8, SamplingParams(max_tokens=24, temperature=0.7, seed=1)).result().sequences
    assert [s.tokens for s in again] == [s.tokens for s in v1_seqs[0.7]]
    report["v1 after v2 loaded T=0.7"] = deltas(again, [reference_logprobs(PROMPT, s.tokens, v1_dir, 0.7) for s in again])
    full = ModelInput.from_ints(PROMPT + again[0].tokens)
    lp1, lp2 = v1.compute_logprobs(full).result(), v2.compute_logprobs(full).result()
    assert lp1[0] is None and np.max(np.abs(np.array(lp1[1:]) - lp2[1:])) > 1e-2

    for name, (mean, mx) in report.items():
        print(f"fidelity {name:28s} mean |d logprob| {mean:.2e}  max {mx:.2e}")
    assert max(mx for _, mx in report.values()) <= TOL, report


def test_request_in_flight_finishes_on_its_version(vllm_engine, tiny_model_path, make_lora_adapter, reference_logprobs):
    """A long request started on version A completes on A while B is loaded mid-flight,
    and A stays loaded (not evicted) until its request is done."""
    noisy = make_lora_adapter(seed=11, scale=0.6)  # near-uniform next-token distribution: long sequences
    old = create_sampling_client(tiny_model_path, noisy, policy_version=10)
    future = old.sample(ModelInput.from_ints(PROMPT), 16, SamplingParams(max_tokens=500, temperature=1.0, seed=3))
    newer = [create_sampling_client(tiny_model_path, make_lora_adapter(seed=20 + i), policy_version=11 + i)
             for i in range(vllm_engine.table.capacity)]  # enough versions that A is no longer among the newest
    assert not future.done(), "the request finished before the new version loaded; make it longer"
    assert not old.adapter.evicted  # in flight: kept
    seqs = future.result().sequences
    assert all(s.policy_version == 10 for s in seqs) and max(len(s.tokens) for s in seqs) > 50
    mean, mx = deltas(seqs, [reference_logprobs(PROMPT, s.tokens, noisy) for s in seqs])
    print(f"in-flight request on the old version: mean |d logprob| {mean:.2e}  max {mx:.2e}")
    assert mx <= TOL
    time.sleep(0.2)
    assert old.adapter.evicted  # evicted once idle
    with pytest.raises(AdapterEvictedError, match="evicted"):
        old.sample(ModelInput.from_ints(PROMPT), 1, SamplingParams(max_tokens=2))
    assert newer[-1].sample(ModelInput.from_ints(PROMPT), 1, SamplingParams(max_tokens=2)).result().sequences


def test_prefix_cache_is_per_adapter(vllm_engine, tiny_model_path, make_lora_adapter, reference_logprobs):
    """vLLM keys prefix-cache blocks by LoRA name + path: a long prompt cached under adapter A
    is reused by A only; B and the base compute their own KV (and their own logprobs)."""
    a_dir, b_dir = make_lora_adapter(seed=31), make_lora_adapter(seed=32)
    a = create_sampling_client(tiny_model_path, a_dir, policy_version=31)
    b = create_sampling_client(tiny_model_path, b_dir, policy_version=32)
    base = create_sampling_client(tiny_model_path)
    long_prompt = [(7 * i) % 300 + 20 for i in range(300)]  # > 2 KV blocks of 128 on CPU
    params = SamplingParams(max_tokens=8, temperature=1.0, seed=0)

    def run(client, adapter):
        before = vllm_engine.stats["cached_prompt_tokens"]
        seq = client.sample(ModelInput.from_ints(long_prompt), 1, params).result().sequences[0]
        mean, mx = deltas([seq], [reference_logprobs(long_prompt, seq.tokens, adapter)])
        assert mx <= TOL
        return vllm_engine.stats["cached_prompt_tokens"] - before

    assert run(a, a_dir) == 0
    assert run(a, a_dir) >= 256  # the cache works: A hits its own blocks
    assert run(b, b_dir) == 0  # ... but B never gets them
    assert run(base, None) == 0  # ... nor the base model
    # and prompt logprobs are each adapter's own
    for client, adapter in ((a, a_dir), (b, b_dir), (base, None)):
        lps = client.compute_logprobs(ModelInput.from_ints(long_prompt)).result()
        assert np.max(np.abs(np.array(lps[1:]) - reference_logprobs(long_prompt[:1], long_prompt[1:], adapter))) <= TOL


def test_mixed_batch_of_base_and_adapters(vllm_engine, tiny_model_path, make_lora_adapter, reference_logprobs):
    """Base-model and adapter requests decoded in the same batches each get their own weights,
    also with every adapter slot occupied (guards the CPU no-LoRA index bug, see _zero_adapter)."""
    paths = [None] + [make_lora_adapter(seed=60 + i) for i in range(vllm_engine.table.capacity)]
    clients = [create_sampling_client(tiny_model_path, p, policy_version=60 + i) for i, p in enumerate(paths)]
    params = SamplingParams(max_tokens=16, temperature=1.0, seed=9)
    futures = [c.sample(ModelInput.from_ints(PROMPT), 4, params) for c in clients]
    worst = 0.0
    for path, future in zip(paths, futures):
        seqs = future.result().sequences
        worst = max(worst, deltas(seqs, [reference_logprobs(PROMPT, s.tokens, path) for s in seqs])[1])
    print(f"mixed batch (base + {len(paths) - 1} adapters): max |d logprob| {worst:.2e}")
    assert worst <= TOL


def test_prompt_logprobs_alongside_other_requests(vllm_engine, tiny_model_path, make_lora_adapter, reference_logprobs):
    """vLLM 0.32 kills its engine when a prompt-logprob request shares an engine step with
    other requests (rlpipe/sampling/prompt_logprob_lock.py); rlpipe runs those alone, so concurrent
    compute_logprobs calls and samples all succeed, each with the right logprobs."""
    adapter = make_lora_adapter(seed=70)
    client = create_sampling_client(tiny_model_path, adapter, policy_version=70)
    prompts = [PROMPT + [10 + i, 20 + i] for i in range(4)]
    params = SamplingParams(max_tokens=24, temperature=1.0, seed=3)
    samples = [client.sample(ModelInput.from_ints(PROMPT), 4, params) for _ in range(3)]
    scores = [client.compute_logprobs(ModelInput.from_ints(p)) for p in prompts]
    samples += [client.sample(ModelInput.from_ints(PROMPT), 2, params)]
    for p, future in zip(prompts, scores):
        got = future.result()[1:]
        want = reference_logprobs(p[:1], p[1:], adapter)
        assert np.abs(np.asarray(got) - np.asarray(want)).max() <= TOL
    for future in samples:
        seqs = future.result().sequences
        assert deltas(seqs, [reference_logprobs(PROMPT, s.tokens, adapter) for s in seqs])[1] <= TOL
    assert vllm_engine.alive


def test_vllm_and_local_backends_agree(vllm_engine, tiny_model_path, make_lora_adapter, reference_logprobs):
    adapter = make_lora_adapter(seed=41)
    for path in (None, adapter):
        v = create_sampling_client(tiny_model_path, path, policy_version=41)
        local = create_sampling_client(tiny_model_path, path, backend="local", policy_version=41)
        seqs = v.sample(ModelInput.from_ints(PROMPT), 4, SamplingParams(max_tokens=20, temperature=1.0, seed=2)).result().sequences
        for s in seqs:
            scored = local.compute_logprobs(ModelInput.from_ints(PROMPT + s.tokens)).result()[len(PROMPT):]
            assert np.max(np.abs(np.array(s.logprobs) - scored)) <= TOL
        # processed logprobs with top_k / top_p, both backends against the same reference
        params = SamplingParams(max_tokens=20, temperature=0.8, top_k=30, top_p=0.9, seed=4)
        for client in (v, local):
            for s in client.sample(ModelInput.from_ints(PROMPT), 4, params).result().sequences:
                ref = reference_logprobs(PROMPT, s.tokens, path, 0.8, 30, 0.9)
                assert np.max(np.abs(np.array(s.logprobs) - ref)) <= TOL


# --------------------------------------------------------------------------- request semantics


def test_stops_seeds_and_num_samples(vllm_engine, tiny_model_path):
    client = create_sampling_client(tiny_model_path)
    prompt = ModelInput.from_ints(PROMPT)
    eos = 1  # <|end|>
    a = client.sample(prompt, 6, SamplingParams(max_tokens=30, seed=7)).result().sequences
    b = client.sample(prompt, 6, SamplingParams(max_tokens=30, seed=7)).result().sequences
    c = client.sample(prompt, 6, SamplingParams(max_tokens=30, seed=8)).result().sequences
    assert len(a) == 6 and [s.tokens for s in a] == [s.tokens for s in b]
    assert [s.tokens for s in a] != [s.tokens for s in c]
    for s in a:
        assert (s.stop_reason == "stop") == (s.tokens[-1] == eos) and len(s.logprobs) == len(s.tokens)
    short = client.sample(prompt, 8, SamplingParams(max_tokens=2, seed=3)).result().sequences
    assert all(s.stop_reason == "length" and len(s.tokens) == 2 for s in short if s.tokens[-1] != eos)
    stop_id = next(t for t in a[0].tokens if t != eos)
    for s in client.sample(prompt, 6, SamplingParams(max_tokens=30, seed=7, stop=[stop_id])).result().sequences:
        assert s.stop_reason == "stop" and s.tokens[-1] in (stop_id, eos) and stop_id not in s.tokens[:-1]
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_path)
    word = tok.decode(a[0].tokens, skip_special_tokens=True).strip().split(" ")[0]
    hit = 0
    for s in client.sample(prompt, 6, SamplingParams(max_tokens=30, seed=7, stop=word)).result().sequences:
        if word in tok.decode(s.tokens, skip_special_tokens=True):
            hit += 1  # stopped at the token completing the stop string, which is kept
            assert s.stop_reason == "stop" and word not in tok.decode(s.tokens[:-1], skip_special_tokens=True)
    assert hit


def test_bad_input_is_rejected_before_the_engine(vllm_engine, tiny_model_path, make_lora_adapter, tmp_path):
    client = create_sampling_client(tiny_model_path)
    ok = SamplingParams(max_tokens=3)
    cases = {
        "empty": ModelInput.empty(),
        "max_model_len": ModelInput.from_ints([20] * (vllm_engine.max_model_len + 1)),
        "outside the vocabulary": ModelInput.from_ints([20, -1]),
        "outside the vocabulary ": ModelInput.from_ints([20, vllm_engine.vocab_size]),
    }
    for match, prompt in cases.items():
        with pytest.raises(ValueError, match=match.strip()):
            client.sample(prompt, 1, ok)
        assert client.sample(ModelInput.from_ints(PROMPT), 1, ok).result().sequences  # still serving
    with pytest.raises(FileNotFoundError, match="does not exist"):
        create_sampling_client(tiny_model_path, str(tmp_path / "missing"))
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "adapter_config.json").write_text("{}")
    (bad / "adapter_model.safetensors").write_bytes(b"junk")
    with pytest.raises(ValueError, match="peft_type"):
        create_sampling_client(tiny_model_path, str(bad))
    with pytest.raises(ValueError, match="max_lora_rank"):
        vllm_engine.load_adapter(make_lora_adapter(seed=51, rank=64), 51)
    assert vllm_engine.alive
    assert client.sample(ModelInput.from_ints(PROMPT), 1, ok).result().sequences


def test_timeout_aborts_and_engine_stays_usable(vllm_engine, tiny_model_path, make_lora_adapter):
    noisy = make_lora_adapter(seed=11, scale=0.6)  # long sequences: they cannot end by EOS in time
    client = create_sampling_client(tiny_model_path, noisy, policy_version=10, timeout_s=0.05)
    t = time.monotonic()
    with pytest.raises(SamplingTimeout, match="did not finish within 0.05 s; the request was aborted"):
        client.sample(ModelInput.from_ints(PROMPT), 64, SamplingParams(max_tokens=400)).result()
    assert time.monotonic() - t < 5
    assert client.sample(ModelInput.from_ints(PROMPT), 1, SamplingParams(max_tokens=3), timeout=60).result().sequences


async def test_cancelled_request_is_aborted_in_the_engine(vllm_engine, tiny_model_path, make_lora_adapter):
    """Cancelling the task that awaits sample_async (an episode that timed out or was
    cancelled) aborts the request in vLLM: within a second neither vLLM's front end nor the
    engine core process holds a request, where the same request left alone decodes for
    seconds more. A request that is not cancelled, running next to a cancelled one, completes."""
    import asyncio

    client = create_sampling_client(tiny_model_path, make_lora_adapter(seed=11, scale=0.3), policy_version=10)
    # Seeded: among these 64 samples one runs to the end of the context (1018 tokens), so the
    # request decodes for ~1000 steps (~2.5 s here); the uncancelled control below measures it.
    params = SamplingParams(max_tokens=vllm_engine.max_model_len - len(PROMPT) - 1, temperature=1.0, seed=0)
    prompt = ModelInput.from_ints(PROMPT)

    async def cancel_while_decoding(task) -> float:
        while vllm_engine.unfinished_requests() == 0:
            assert not task.done()
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.3)
        assert not task.done(), "the request finished before it was cancelled; make it longer"
        task.cancel()
        return time.monotonic()

    # Alone: cancelled, then gone from the engine.
    doomed = asyncio.ensure_future(client.sample_async(prompt, 64, params))
    cancelled_at = await cancel_while_decoding(doomed)
    with pytest.raises(asyncio.CancelledError):
        await doomed
    while vllm_engine.unfinished_requests() or await asyncio.to_thread(vllm_engine.engine_core_busy):
        assert time.monotonic() - cancelled_at < 1.0, f"{vllm_engine.unfinished_requests()} requests still in the engine"
        await asyncio.sleep(0.02)
    aborted_s = time.monotonic() - cancelled_at

    # Next to the same request, uncancelled: that one completes, every sequence in full.
    started = time.monotonic()
    kept = asyncio.ensure_future(client.sample_async(prompt, 64, params))
    doomed = asyncio.ensure_future(client.sample_async(prompt, 64, params))
    await cancel_while_decoding(doomed)
    response = await kept
    kept_s = time.monotonic() - started
    assert doomed.cancelled() and len(response.sequences) == 64
    assert all(s.policy_version == 10 and len(s.logprobs) == len(s.tokens) > 0 for s in response.sequences)
    longest = max(len(s.tokens) for s in response.sequences)
    print(f"cancelled request out of the engine {aborted_s:.2f} s after the cancel; the same request "
          f"uncancelled decoded for {kept_s:.1f} s ({longest} tokens)")
    assert kept_s > 0.3 + 1.0 + 0.5  # left alone, it would still have been decoding at the 1 s bound
    assert not await asyncio.to_thread(vllm_engine.engine_core_busy) and vllm_engine.unfinished_requests() == 0


async def test_sample_async_from_another_event_loop(vllm_engine, tiny_model_path):
    import asyncio

    client = create_sampling_client(tiny_model_path)
    params = SamplingParams(max_tokens=6, temperature=0.7)
    out = await asyncio.gather(*[client.sample_async(ModelInput.from_ints(PROMPT[: 2 + i]), 2, params) for i in range(4)])
    assert [len(r.sequences) for r in out] == [2] * 4
    lps = await client.compute_logprobs_async(ModelInput.from_ints(PROMPT))
    assert lps[0] is None and len(lps) == len(PROMPT)


def test_private_engine_base_guard_then_death(vllm_engine, tiny_model_path, make_lora_adapter, reference_logprobs):
    """On a private engine: (1) a base request running without LoRA while adapters are loaded
    and used keeps base logprobs (the CPU no-LoRA index guard, see VLLMEngine._zero_adapter);
    (2) killing the engine core makes running and new requests fail fast and clearly.
    The private engine serves the tiny architecture with random weights: near-uniform next
    tokens, so base sequences run long (the trained tiny model ends them after a few tokens)."""
    from rlpipe.sampling.client import SamplingClient
    from rlpipe.sampling.vllm_backend import VLLMEngine
    from rlpipe.testing.embedded import default_model_path

    random_base = str(default_model_path(train_steps=0))  # same shapes: the adapters fit
    engine = VLLMEngine(random_base)
    try:
        base = SamplingClient(engine, None, 0)
        running = base.sample(ModelInput.from_ints(PROMPT), 16, SamplingParams(max_tokens=400, seed=0))
        users = []
        for i in range(engine.table.capacity + 1):  # fill every LoRA slot, the last one included
            adapter = engine.load_adapter(make_lora_adapter(seed=70 + i), 70 + i)
            users.append(SamplingClient(engine, adapter, 70 + i).sample(ModelInput.from_ints(PROMPT), 2, SamplingParams(max_tokens=8)))
        seqs = running.result().sequences
        mean, mx = deltas(seqs, [reference_logprobs(PROMPT, s.tokens, base=random_base) for s in seqs])
        print(f"base request during adapter loads ({sum(len(s.tokens) for s in seqs)} tokens): "
              f"mean |d logprob| {mean:.2e}  max {mx:.2e}")
        assert mx <= TOL
        assert all(u.result().sequences for u in users)

        noisy = SamplingClient(engine, engine.load_adapter(make_lora_adapter(seed=11, scale=0.6), 1), 1)
        running = noisy.sample(ModelInput.from_ints(PROMPT), 64, SamplingParams(max_tokens=400))
        for pid in engine.engine_core_pids():
            os.kill(pid, signal.SIGKILL)
        t = time.monotonic()
        with pytest.raises(EngineDeadError, match="died"):
            running.result(timeout=30)
        assert time.monotonic() - t < 20
        deadline = time.monotonic() + 10
        while engine.alive and time.monotonic() < deadline:
            time.sleep(0.1)
        with pytest.raises(EngineDeadError, match="died"):
            base.sample(ModelInput.from_ints(PROMPT), 1, SamplingParams(max_tokens=2))
    finally:
        engine.shutdown()
    # the shared engine is unaffected
    assert create_sampling_client(tiny_model_path).sample(ModelInput.from_ints(PROMPT), 1, SamplingParams(max_tokens=2)).result()
