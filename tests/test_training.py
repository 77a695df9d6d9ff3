"""TrainingClient on the real tiny model with real peft adapters (no fakes)."""

import asyncio
import math

import numpy as np
import pytest
import torch

from rlpipe import ServiceClient, types
from rlpipe.training.client import TrainingClient
from tests.learning import holds

ADAM = types.AdamParams(learning_rate=1e-2, grad_clip_norm=1.0)


@pytest.fixture
def service(tmp_path):
    return ServiceClient(tmp_path / "ckpt")


@pytest.fixture
def client(service, tiny_model_path, learning_seed):
    return service.create_lora_training_client(tiny_model_path, rank=4, seed=learning_seed)


def sft_datum(tokenizer, text):
    ids = tokenizer(text)["input_ids"] + [tokenizer.eos_token_id]
    return types.Datum(
        model_input=types.ModelInput.from_ints(ids[:-1]),
        loss_fn_inputs={"target_tokens": ids[1:], "weights": np.ones(len(ids) - 1, dtype=np.float32)},
    )


def rl_datum(n, seed, vocab):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, vocab, n + 1)
    return types.Datum(
        model_input=types.ModelInput.from_ints(tokens[:-1].tolist()),
        loss_fn_inputs={
            "target_tokens": tokens[1:],
            "logprobs": -rng.uniform(0.5, 6.0, n).astype(np.float32),
            "advantages": rng.normal(size=n).astype(np.float32),
        },
    )


def grads(client):
    return {n: p.grad.clone() for n, p in client.model.named_parameters() if p.grad is not None}


TEXTS = ["12 + 7 = 19", "the answer is 42", "3 * 4 = 12 and more", "5"]


@pytest.mark.learning
def test_sft_loss_falls_and_info(client):
    data = [sft_datum(client.get_tokenizer(), t) for t in TEXTS]
    first = client.forward_backward(data, "cross_entropy").result().metrics["loss:sum"]
    for _ in range(10):
        client.optim_step(ADAM).result()
        last = client.forward_backward(data, "cross_entropy").result().metrics["loss:sum"]
    holds(last / first, "<", 0.7, "loss after 10 SFT steps / before")
    info = client.get_info()
    assert info.step == 10 and info.trainable_params > 0 and info.vocab_size == client.vocab_size


def test_forward_has_no_grad_and_matches_forward_backward(client):
    data = [sft_datum(client.get_tokenizer(), t) for t in TEXTS]
    fwd = client.forward(data, "cross_entropy").result()
    assert not grads(client)
    fb = client.forward_backward(data, "cross_entropy").result()
    assert fwd.metrics["loss:sum"] == pytest.approx(fb.metrics["loss:sum"], rel=1e-6)
    for a, b in zip(fwd.loss_fn_outputs, fb.loss_fn_outputs):
        np.testing.assert_allclose(a["logprobs"].to_numpy(), b["logprobs"].to_numpy(), atol=1e-6)
    # Tinker semantics: loss:sum is -sum(logprobs * weights) for cross-entropy.
    total = sum(o["logprobs"].to_numpy().sum() for o in fwd.loss_fn_outputs)
    assert fwd.metrics["loss:sum"] == pytest.approx(-total, rel=1e-5)


def test_forward_temperature_scales_logits(client):
    datum = sft_datum(client.get_tokenizer(), TEXTS[0])
    tokens = torch.tensor([datum.model_input.to_ints()])
    with torch.no_grad():
        logits = client.model(input_ids=tokens).logits[0]
    expected = torch.log_softmax(logits / 0.7, -1).gather(-1, datum.loss_fn_inputs["target_tokens"].to_torch()[:, None])
    out = client.forward([datum], "cross_entropy", {"temperature": 0.7}).result()
    np.testing.assert_allclose(out.loss_fn_outputs[0]["logprobs"].to_numpy(), expected[:, 0].numpy(), atol=1e-5)


def assert_equal(batch, batch_grads, singles, single_grads):
    assert batch.metrics["loss:sum"] == pytest.approx(sum(s.metrics["loss:sum"] for s in singles), rel=1e-10)
    for b, s in zip(batch.loss_fn_outputs, singles):
        np.testing.assert_allclose(b["logprobs"].to_numpy(), s.loss_fn_outputs[0]["logprobs"].to_numpy(), atol=1e-6)
    assert batch_grads.keys() == single_grads.keys() and batch_grads
    for name in batch_grads:
        torch.testing.assert_close(batch_grads[name], single_grads[name], rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("loss_fn", ["importance_sampling", "ppo", "cispo", "dro"])
def test_packed_equals_sum_of_single_datum_calls(service, tiny_model_path, loss_fn):
    # float64, so that "equal" can be checked tightly rather than up to fp32 summation order
    client = service.create_lora_training_client(tiny_model_path, rank=4, seed=0, dtype="float64")
    data = [rl_datum(n, seed, client.vocab_size) for seed, n in enumerate([17, 3, 40, 9, 1])]
    packed = client.forward_backward(data, loss_fn).result()
    packed_grads = grads(client)
    client.model.zero_grad(set_to_none=True)
    singles = [client.forward_backward([d], loss_fn).result() for d in data]
    single_grads = grads(client)  # accumulated over the single calls
    assert_equal(packed, packed_grads, singles, single_grads)


def test_packing_and_padding_agree(service, tiny_model_path):
    data = [rl_datum(n, seed, 300) for seed, n in enumerate([30, 4, 12, 7])]
    packed = service.create_lora_training_client(tiny_model_path, rank=4, seed=1, layout="rows", row_tokens=40)
    padded = service.create_lora_training_client(tiny_model_path, rank=4, seed=1, layout="padded")
    a = packed.forward(data, "importance_sampling").result()
    b = padded.forward(data, "importance_sampling").result()
    for x, y in zip(a.loss_fn_outputs, b.loss_fn_outputs):
        np.testing.assert_allclose(x["logprobs"].to_numpy(), y["logprobs"].to_numpy(), atol=2e-5)


def test_custom_loss_matches_builtin_gradients(client):
    data = [rl_datum(n, seed, client.vocab_size) for seed, n in enumerate([11, 5, 8])]
    builtin = client.forward_backward(data, "importance_sampling").result()
    builtin_grads = grads(client)
    client.model.zero_grad(set_to_none=True)

    def is_loss(batch, logprobs):
        total = 0
        for datum, lp in zip(batch, logprobs):
            ratio = torch.exp(lp - datum.loss_fn_inputs["logprobs"].to_torch())
            total = total - (ratio * datum.loss_fn_inputs["advantages"].to_torch()).sum()
        return total, {}

    custom = client.forward_backward_custom(data, is_loss).result()
    assert custom.metrics["loss:sum"] == pytest.approx(builtin.metrics["loss:sum"], rel=1e-5)
    custom_grads = grads(client)
    for name in builtin_grads:
        torch.testing.assert_close(custom_grads[name], builtin_grads[name], rtol=1e-5, atol=1e-7)


def test_save_state_round_trip_is_bitwise(service, tiny_model_path):
    data = [rl_datum(n, seed, 300) for seed, n in enumerate([12, 6, 20])]
    a = service.create_lora_training_client(tiny_model_path, rank=4, seed=3)
    for _ in range(3):
        a.forward_backward(data, "ppo").result()
        a.optim_step(ADAM).result()
    path = a.save_state("mid").result().path
    a.forward_backward(data, "ppo").result()
    a.optim_step(ADAM).result()

    b = service.create_lora_training_client(tiny_model_path, rank=4, seed=99)
    loaded = b.load_state_with_optimizer(path).result()
    assert loaded.step == 3 and b.step == 3
    b.forward_backward(data, "ppo").result()
    b.optim_step(ADAM).result()
    wa, wb = a.trainable_state(), b.trainable_state()
    assert wa.keys() == wb.keys()
    for name in wa:
        assert torch.equal(wa[name], wb[name]), name

    c = service.create_training_client_from_state_with_optimizer(path)
    assert c.step == 3 and c.lora == a.lora
    d = service.create_training_client_from_state(path)
    assert all(not s for s in d.optimizer.state.values())


def test_sampler_weights_load_in_plain_peft(client, tiny_model_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    data = [sft_datum(client.get_tokenizer(), t) for t in TEXTS]
    for _ in range(3):
        client.forward_backward(data, "cross_entropy").result()
        client.optim_step(ADAM).result()
    path = client.save_weights_for_sampler("s1").result().path
    base = AutoModelForCausalLM.from_pretrained(tiny_model_path, dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(base, path).eval()
    tokens = torch.tensor([data[0].model_input.to_ints()])
    with torch.no_grad():
        ours = client.model(input_ids=tokens).logits
        theirs = peft_model(input_ids=tokens).logits
        plain = AutoModelForCausalLM.from_pretrained(tiny_model_path, dtype=torch.float32)(input_ids=tokens).logits
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-5)
    assert (ours - plain).abs().max() > 1e-3  # the adapter is really in effect
    from safetensors.torch import load_file

    saved = load_file(f"{path}/adapter_model.safetensors")
    assert saved and all("lora_" in k for k in saved), sorted(saved)  # no full base weights


@pytest.mark.parametrize(
    "flags, expected",
    [
        (dict(train_mlp=True, train_attn=True, train_unembed=True),
         {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"}),
        (dict(train_mlp=False, train_attn=True, train_unembed=False), {"q_proj", "k_proj", "v_proj", "o_proj"}),
        (dict(train_mlp=True, train_attn=False, train_unembed=False), {"gate_proj", "up_proj", "down_proj"}),
        (dict(train_mlp=False, train_attn=False, train_unembed=True), {"lm_head"}),
    ],
)
def test_lora_goes_on_exactly_the_intended_modules(service, tiny_model_path, flags, expected):
    client = service.create_lora_training_client(tiny_model_path, rank=2, **flags)
    with_lora = {n.rsplit(".", 1)[-1] for n, m in client.model.named_modules() if hasattr(m, "lora_A")}
    assert with_lora == expected
    n_layers = client.model.config.num_hidden_layers
    count = sum(1 for _, m in client.model.named_modules() if hasattr(m, "lora_A"))
    assert count == len(expected - {"lm_head"}) * n_layers + ("lm_head" in expected)
    trainable = [n for n, p in client.model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)


def test_lora_needs_a_target(service, tiny_model_path):
    with pytest.raises(ValueError, match="targets nothing"):
        service.create_lora_training_client(tiny_model_path, rank=2, train_mlp=False, train_attn=False, train_unembed=False)


def test_bad_inputs_raise_clear_errors(client, tmp_path):
    tok = client.get_tokenizer()
    good = sft_datum(tok, TEXTS[0])
    n = good.model_input.length

    def with_inputs(**inputs):
        return types.Datum(model_input=good.model_input, loss_fn_inputs={**good.loss_fn_inputs, **inputs})

    cases = [
        ([with_inputs(weights=np.ones(n + 2, dtype=np.float32))], "cross_entropy", "weights.*shape"),
        ([with_inputs(target_tokens=[client.vocab_size + 5] * n)], "cross_entropy", "outside the vocabulary"),
        ([types.Datum(model_input=types.ModelInput.from_ints([-1] * n), loss_fn_inputs=good.loss_fn_inputs)],
         "cross_entropy", "outside the vocabulary"),
        ([good], "reinforce_plus_plus", "unknown loss"),
        ([good], "importance_sampling", "missing loss input 'logprobs'"),
        ([], "cross_entropy", "no data"),
    ]
    for data, loss_fn, match in cases:
        with pytest.raises(ValueError, match=match):
            client.forward_backward(data, loss_fn).result()
    rl = rl_datum(n, 0, client.vocab_size)
    for name in ("advantages", "logprobs"):
        for bad in (np.nan, np.inf):
            values = rl.loss_fn_inputs[name].to_numpy().copy()
            values[1] = bad
            datum = types.Datum(model_input=rl.model_input, loss_fn_inputs={**rl.loss_fn_inputs, name: values})
            with pytest.raises(ValueError, match=name):
                client.forward_backward([datum], "importance_sampling").result()
    assert not grads(client)  # nothing half-applied
    with pytest.raises(FileNotFoundError, match="not a directory"):
        client.load_state(str(tmp_path / "missing")).result()
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="not an rlpipe state checkpoint"):
        client.load_state(str(tmp_path / "empty")).result()
    with pytest.raises(ValueError, match="plain, non-empty directory name"):
        client.save_state("../escape").result()
    # the client is still healthy after all of that
    assert math.isfinite(client.forward_backward([good], "cross_entropy").result().metrics["loss:sum"])


@pytest.mark.learning
def test_async_calls_run_in_submission_order(client):
    data = [sft_datum(client.get_tokenizer(), t) for t in TEXTS]

    async def main():
        fb1 = await client.forward_backward_async(data, "cross_entropy")
        step = await client.optim_step_async(ADAM)
        fb2 = await client.forward_backward_async(data, "cross_entropy")
        return await fb1, await step, await fb2.result_async()

    first, step, second = asyncio.run(main())
    assert step.step == 1
    holds(second.metrics["loss:sum"] / first.metrics["loss:sum"], "<", 1.0, "loss after the step / before")


def test_base_model_must_exist(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a local Hugging Face model directory"):
        TrainingClient(str(tmp_path / "nope"), types.LoraConfig(rank=2), tmp_path)


def test_future_reports_errors_and_deadlines_apart():
    import concurrent.futures
    import time

    from rlpipe.training.api_future import APIFuture, CallTimeout

    pool = concurrent.futures.ThreadPoolExecutor(1)

    def raise_timeout():
        raise TimeoutError("the call's own timeout")

    with pytest.raises(TimeoutError, match="the call's own timeout"):
        APIFuture(pool.submit(raise_timeout), "call", 5).result()
    with pytest.raises(CallTimeout, match="slow did not finish"):
        APIFuture(pool.submit(time.sleep, 1.0), "slow", 0.05).result()
    pool.shutdown()
