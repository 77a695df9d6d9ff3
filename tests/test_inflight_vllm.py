"""In-flight weight updates on vLLM (weight_updates="inflight", rlpipe/sampling/inflight.py):
an adapter loaded in the middle of a sequence reaches it at its next token, every token keeps
the version that sampled it with that version's logprob, and requests after an update never
reuse KV from an earlier version.

The engine here is private (an in-flight engine has one live adapter slot, which the
session's shared engine must not have); it is started once for the module and stopped at
its end."""

import time

import numpy as np
import pytest

pytest.importorskip("vllm", reason="vLLM is not installed: vLLM sampling tests skipped")

from rlpipe.sampling import SamplingClient, start_engine  # noqa: E402
from rlpipe.types import ModelInput, SamplingParams  # noqa: E402

pytestmark = pytest.mark.slow  # starts an engine

PROMPT = [3, 40, 50, 60, 4]
TOL = 1e-3  # the fidelity bound of tests/test_sampling_vllm.py (fp32 on both sides)


@pytest.fixture(scope="module")
def engine(tiny_model_path):
    engine = start_engine(tiny_model_path, "vllm", weight_updates="inflight", max_loaded_adapters=2)
    yield engine
    engine.shutdown()


def update_mid_sequence(engine, first_dir, second_dir, v1, v2):
    """Sample 8 long sequences on v1 and load v2 while they decode; the sequences."""
    client = SamplingClient(engine, engine.load_adapter(first_dir, v1), v1)
    future = client.sample(ModelInput.from_ints(PROMPT), 8, SamplingParams(max_tokens=400, temperature=1.0, seed=3))
    deadline = time.monotonic() + 60
    while engine.unfinished_requests() == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.3)  # some tokens on v1
    assert not future.done(), "the request finished before the update; make it longer"
    engine.load_adapter(second_dir, v2)
    return client, future.result().sequences


def worst_mismatch(seqs, dirs, reference_logprobs) -> float:
    """max |sampling logprob - peft's logprob under the version that sampled the token|."""
    worst = 0.0
    for s in seqs:
        versions = np.array(s.token_versions())
        for v in set(versions.tolist()):
            ref = np.array(reference_logprobs(PROMPT, s.tokens, dirs[v]))
            worst = max(worst, float(np.abs(np.array(s.logprobs) - ref)[versions == v].max()))
    return worst


def test_update_reaches_running_sequences_with_exact_logprobs(engine, make_lora_adapter, reference_logprobs):
    # Two unrelated near-uniform adapters: long sequences, and KV written by one is far from the other's.
    dirs = {1: make_lora_adapter(seed=81, scale=0.6), 2: make_lora_adapter(seed=82, scale=0.6)}
    client, seqs = update_mid_sequence(engine, dirs[1], dirs[2], 1, 2)
    spanning = [s for s in seqs if s.policy_versions is not None]
    assert spanning, "no sequence was reached by the update"
    for s in spanning:
        assert s.policy_version == 1 and s.policy_versions[0] == 1 and s.policy_versions[-1] == 2
        assert s.policy_versions == sorted(s.policy_versions) and len(s.policy_versions) == len(s.tokens)
    assert all(s.stop_reason in ("stop", "length") for s in seqs)  # none aborted
    worst = worst_mismatch(seqs, dirs, reference_logprobs)
    print(f"across an in-flight update: max |d logprob| {worst:.2e} "
          f"({sum(s.token_versions().count(2) for s in seqs)} tokens on v2)")
    assert worst <= TOL
    assert engine.stats["inflight_updates"] >= 1
    # A request after the update, even through the v1 client, samples v2 and says so.
    later = client.sample(ModelInput.from_ints(PROMPT), 2, SamplingParams(max_tokens=16, seed=4)).result().sequences
    assert all(s.policy_version == 2 and s.policy_versions is None for s in later)
    assert worst_mismatch(later, dirs, reference_logprobs) <= TOL


def test_no_prefix_cache_reuse_across_versions(engine, make_lora_adapter, reference_logprobs):
    dirs = {3: make_lora_adapter(seed=83), 4: make_lora_adapter(seed=84)}
    client = SamplingClient(engine, engine.load_adapter(dirs[3], 3), 3)
    long_prompt = [(7 * i) % 300 + 20 for i in range(300)]  # > 2 KV blocks of 128 on CPU
    params = SamplingParams(max_tokens=8, temperature=1.0, seed=0)

    def cached_tokens(version):
        before = engine.stats["cached_prompt_tokens"]
        seq = client.sample(ModelInput.from_ints(long_prompt), 1, params).result().sequences[0]
        assert seq.policy_version == version
        ref = reference_logprobs(long_prompt, seq.tokens, dirs[version])
        assert np.abs(np.array(seq.logprobs) - ref).max() <= TOL
        return engine.stats["cached_prompt_tokens"] - before

    cached_tokens(3)
    assert cached_tokens(3) >= 256  # the cache works within a version
    engine.load_adapter(dirs[4], 4)
    assert cached_tokens(4) == 0  # ... and never hands v3's blocks to v4
    assert cached_tokens(4) >= 256


def test_keeping_the_kv_would_break_the_logprobs(engine, make_lora_adapter, reference_logprobs):
    """Why the KV is recomputed (inflight.py): kept, tokens after the update attend to KV the old
    weights wrote, and their logprobs are no version's."""
    dirs = {5: make_lora_adapter(seed=85, scale=0.6), 6: make_lora_adapter(seed=86, scale=0.6)}
    engine._live.recompute_kv = False
    try:
        _, seqs = update_mid_sequence(engine, dirs[5], dirs[6], 5, 6)
    finally:
        engine._live.recompute_kv = True
    assert any(s.policy_versions for s in seqs)
    worst = worst_mismatch(seqs, dirs, reference_logprobs)
    print(f"kept KV across an update: max |d logprob| {worst:.2e}")
    assert worst > 100 * TOL
