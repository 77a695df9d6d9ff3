"""Sampling: request validation, the adapter table, and the local (torch) backend.

The vLLM backend has the same contract; its tests are in test_sampling_vllm.py."""

import asyncio
import json
import shutil

import numpy as np
import pytest

from rlpipe.sampling import SamplingTimeout, create_sampling_client
from rlpipe.sampling.adapters import Adapter, AdapterTable, base_weight_shapes, check_adapter, write_zero_adapter
from rlpipe.sampling.client import check_prompt, resolve_params
from rlpipe.sampling.errors import AdapterEvictedError
from rlpipe.types import ModelInput, SamplingParams

PROMPT = [3, 40, 50, 60, 4]


@pytest.fixture(scope="module")
def local(tiny_model_path):
    return create_sampling_client(tiny_model_path, backend="local")


def max_delta(a, b):
    return float(np.max(np.abs(np.asarray(a) - np.asarray(b))))


# --------------------------------------------------------------------------- validation (no engine)


def test_prompt_validation_names_the_problem():
    with pytest.raises(ValueError, match="empty"):
        check_prompt(ModelInput.empty(), 100, 50, room=1)
    with pytest.raises(ValueError, match="max_model_len"):
        check_prompt(ModelInput.from_ints([1] * 60), 100, 50, room=1)
    with pytest.raises(ValueError, match="no room"):
        check_prompt(ModelInput.from_ints([1] * 50), 100, 50, room=1)
    assert check_prompt(ModelInput.from_ints([1] * 50), 100, 50, room=0) == [1] * 50
    with pytest.raises(ValueError, match=r"outside the vocabulary \[0, 100\): position 1: -1, position 2: 100"):
        check_prompt(ModelInput.from_ints([5, -1, 100]), 100, 50, room=1)
    with pytest.raises(TypeError, match="ModelInput"):
        check_prompt([1, 2, 3], 100, 50, room=1)


def test_sampling_params_resolution():
    d = resolve_params(SamplingParams(max_tokens=None, stop="\n"), prompt_len=10, vocab_size=100, max_model_len=50)
    assert d.max_tokens == 40 and d.stop_strings == ("\n",) and d.stop_token_ids == ()
    d = resolve_params(SamplingParams(max_tokens=1000, stop=[7, 9], top_k=500), 10, 100, 50)
    assert d.max_tokens == 40 and d.stop_token_ids == (7, 9) and d.top_k == -1
    for bad, match in [
        (SamplingParams(max_tokens=0), "max_tokens"),
        (SamplingParams(temperature=-1.0), "temperature"),
        (SamplingParams(temperature=2.5), "temperature"),
        (SamplingParams(top_p=0.0), "top_p"),
        (SamplingParams(top_k=0), "top_k"),
        (SamplingParams(stop=[100]), "stop token"),
        (SamplingParams(stop=[""]), "empty"),
    ]:
        with pytest.raises(ValueError, match=match):
            resolve_params(bad, 10, 100, 50)


def test_adapter_checks(tiny_model_path, make_lora_adapter, tmp_path):
    good = make_lora_adapter(seed=1)
    shapes = base_weight_shapes(tiny_model_path)
    assert check_adapter(good, 32, shapes) == 8
    with pytest.raises(FileNotFoundError, match="does not exist"):
        check_adapter(str(tmp_path / "nope"))
    broken = tmp_path / "broken"
    broken.mkdir()
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        check_adapter(str(broken))
    shutil.copy(f"{good}/adapter_model.safetensors", broken)
    (broken / "adapter_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        check_adapter(str(broken))
    shutil.copy(f"{good}/adapter_config.json", broken)
    (broken / "adapter_model.safetensors").write_bytes(b"\x00garbage" * 10)
    with pytest.raises(ValueError, match="not a readable safetensors"):
        check_adapter(str(broken))
    with pytest.raises(ValueError, match="max_lora_rank"):
        check_adapter(good, max_rank=4)
    # the same adapter claiming another rank, and one for a model with other sizes
    shutil.copy(f"{good}/adapter_model.safetensors", broken)
    config = json.loads((broken / "adapter_config.json").read_text())
    (broken / "adapter_config.json").write_text(json.dumps({**config, "r": 16}))
    with pytest.raises(ValueError, match="do not match r=16"):
        check_adapter(str(broken))
    wrong = {k: [v[0] * 2, *v[1:]] for k, v in shapes.items()}
    with pytest.raises(ValueError, match="does not fit the base model"):
        check_adapter(good, 32, wrong)
    zero = write_zero_adapter(tmp_path / "zero", tiny_model_path, shapes)  # what vLLM-on-CPU serves the base under
    assert check_adapter(str(zero), 32, shapes) == 1


def test_adapter_table_keeps_newest_and_never_evicts_in_flight():
    table = AdapterTable(capacity=2)
    adapters = [Adapter(key=i, version=i, source="", path="", digest=str(i), rank=8) for i in range(5)]
    assert table.add(adapters[0]) == [] and table.add(adapters[1]) == []
    table.acquire(adapters[0])  # a request is running on v0
    assert table.add(adapters[2]) == []  # v0 is too old, but busy: it lingers
    assert table.add(adapters[3]) == [adapters[1]]  # v1 too old and idle: evicted
    assert table.release(adapters[0]) == [adapters[0]]  # v0 goes once its request ends
    assert [a.version for a in table.loaded()] == [2, 3]
    with pytest.raises(AdapterEvictedError, match="version 0 .* evicted"):
        table.acquire(adapters[0])
    assert table.find(3, "3") is adapters[3] and table.find(3, "other") is None


# --------------------------------------------------------------------------- local backend


def test_local_logprobs_are_processed_logprobs(local, reference_logprobs):
    """Sampled logprobs equal log_softmax of the processed logits (T, top_k, top_p)."""
    for params in [
        SamplingParams(max_tokens=16, temperature=1.0, seed=0),
        SamplingParams(max_tokens=16, temperature=0.7, seed=1),
        SamplingParams(max_tokens=16, temperature=0.9, top_k=20, top_p=0.8, seed=2),
        SamplingParams(max_tokens=16, temperature=0.0),
    ]:
        for seq in local.sample(ModelInput.from_ints(PROMPT), 3, params).result().sequences:
            ref = reference_logprobs(PROMPT, seq.tokens, None, params.temperature, params.top_k, params.top_p)
            assert max_delta(seq.logprobs, ref) < 1e-4, params


def test_local_adapter_and_compute_logprobs(tiny_model_path, local, make_lora_adapter, reference_logprobs):
    adapter = make_lora_adapter(seed=1)
    tuned = create_sampling_client(tiny_model_path, adapter, backend="local", policy_version=3)
    seq = tuned.sample(ModelInput.from_ints(PROMPT), 1, SamplingParams(max_tokens=20, temperature=0.8, seed=5)).result().sequences[0]
    assert seq.policy_version == 3
    assert max_delta(seq.logprobs, reference_logprobs(PROMPT, seq.tokens, adapter, 0.8)) < 1e-4
    full = ModelInput.from_ints(PROMPT + seq.tokens)
    scored = tuned.compute_logprobs(full).result()
    assert scored[0] is None and len(scored) == full.length
    assert max_delta(scored[1:], reference_logprobs(PROMPT[:1], PROMPT[1:] + seq.tokens, adapter)) < 1e-4
    base = local.compute_logprobs(full).result()
    assert max_delta(base[1:], scored[1:]) > 1e-2  # the adapter changes the distribution


def test_local_stops_seeds_and_num_samples(local, tiny_model_path):
    prompt = ModelInput.from_ints(PROMPT)
    tok = local.engine.tokenizer
    eos = tok.eos_token_id
    a = local.sample(prompt, 4, SamplingParams(max_tokens=30, seed=7)).result().sequences
    b = local.sample(prompt, 4, SamplingParams(max_tokens=30, seed=7)).result().sequences
    c = local.sample(prompt, 4, SamplingParams(max_tokens=30, seed=8)).result().sequences
    assert len(a) == 4 and [s.tokens for s in a] == [s.tokens for s in b]
    assert [s.tokens for s in a] != [s.tokens for s in c]
    for s in a:
        assert (s.stop_reason == "stop") == (s.tokens[-1] == eos) and len(s.logprobs) == len(s.tokens)
    # max_tokens -> "length"
    short = local.sample(prompt, 8, SamplingParams(max_tokens=2, seed=3)).result().sequences
    assert all(s.stop_reason == "length" and len(s.tokens) == 2 for s in short if s.tokens[-1] != eos)
    # a stop token id ends the sequence and is kept (token-in/token-out)
    stop_id = a[0].tokens[0] if a[0].tokens[0] != eos else a[0].tokens[1]
    for s in local.sample(prompt, 4, SamplingParams(max_tokens=30, seed=7, stop=[stop_id])).result().sequences:
        assert s.stop_reason == "stop" and stop_id not in s.tokens[:-1]
    # a stop string ends the sequence at the token that completes it
    text = tok.decode(a[0].tokens, skip_special_tokens=True)
    word = text.strip().split(" ")[0]
    seqs = local.sample(prompt, 4, SamplingParams(max_tokens=30, seed=7, stop=[word])).result().sequences
    for s in seqs:
        decoded = tok.decode(s.tokens, skip_special_tokens=True)
        if word in decoded:
            assert s.stop_reason == "stop" and word not in tok.decode(s.tokens[:-1], skip_special_tokens=True)


def test_local_bad_input_then_good_request(local, tmp_path):
    prompt = ModelInput.from_ints(PROMPT)
    params = SamplingParams(max_tokens=4)
    too_long = ModelInput.from_ints([1] * (local.engine.max_model_len + 1))
    for bad in [ModelInput.empty(), too_long, ModelInput.from_ints([1, -3]), ModelInput.from_ints([1, 10_000])]:
        with pytest.raises(ValueError):
            local.sample(bad, 1, params)
    with pytest.raises(FileNotFoundError):
        create_sampling_client(local.base_model, str(tmp_path / "missing"), backend="local")
    assert local.sample(prompt, 1, params).result().sequences[0].tokens


def test_local_timeout(local, make_lora_adapter):
    noisy = create_sampling_client(local.base_model, make_lora_adapter(seed=11, scale=0.6), backend="local")
    with pytest.raises(SamplingTimeout, match="did not finish within 0.05 s; the request was aborted"):
        noisy.sample(ModelInput.from_ints(PROMPT), 64, SamplingParams(max_tokens=400), timeout=0.05).result()
    assert local.sample(ModelInput.from_ints(PROMPT), 1, SamplingParams(max_tokens=4)).result().sequences


@pytest.mark.asyncio
async def test_local_sample_async_batches_concurrent_requests(local):
    params = SamplingParams(max_tokens=8, temperature=0.7)
    responses = await asyncio.gather(*[local.sample_async(ModelInput.from_ints(PROMPT[: 2 + i]), 2, params) for i in range(4)])
    assert [len(r.sequences) for r in responses] == [2, 2, 2, 2]
    lps = await local.compute_logprobs_async(ModelInput.from_ints(PROMPT))
    assert lps[0] is None and len(lps) == len(PROMPT)
