"""Layouts and micro-batches of the learner's forward pass equal datum-by-datum computation.

Everything runs in float64 so that "equal" is checked tightly, not up to fp32 summation order.
The reference for a batch is one forward_backward call per datum (a single datum needs no
packing, no mask and no micro-batching), accumulated.
"""

import numpy as np
import pytest
import torch

from rlpipe import ServiceClient, types
from rlpipe.training import forward, packing
from tests.test_training import assert_equal, grads, rl_datum

LOSS = "ppo"  # clipping makes the gradient depend on every logprob, not just its sum


def run(client, data, loss_fn=LOSS):
    client.model.zero_grad(set_to_none=True)
    out = client.forward_backward(data, loss_fn).result()
    return out, grads(client)


def reference(client, data, loss_fn=LOSS):
    client.model.zero_grad(set_to_none=True)
    singles = [client.forward_backward([d], loss_fn).result() for d in data]
    return singles, grads(client)


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    return ServiceClient(tmp_path_factory.mktemp("ckpt"))


def client_for(service, model, **options):
    return service.create_lora_training_client(model, rank=4, seed=0, dtype="float64", **options)


# --------------------------------------------------------------------------- plans


@pytest.mark.parametrize("layout", packing.LAYOUTS)
def test_plan_places_every_datum_once_within_budget(layout):
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 120, 200).tolist() + [600]  # one datum longer than the budget
    batches = packing.plan(lengths, layout, row_tokens=64, max_tokens=512)
    placed = sorted(i for b in batches for i in b.datums)
    assert placed == list(range(len(lengths)))
    for b in batches:
        if len(b.datums) > 1:
            assert b.tensor_tokens <= 512
        for row in b.rows:
            end = 0
            for i, off in zip(row.datums, row.offsets):
                assert off == end  # datums sit end to end, no gaps
                end += lengths[i]
            assert end <= b.width
    assert any(b.datums == [len(lengths) - 1] for b in batches)  # the long one alone
    if layout == "padded":
        assert all(len(row.datums) == 1 for b in batches for row in b.rows)
    if layout == "varlen":
        assert all(len(b.rows) == 1 for b in batches)
    if layout == "rows":
        # rows fill up: apart from the last row of a micro-batch, little is left over
        waste = sum(b.tensor_tokens for b in batches) - sum(lengths)
        assert waste < 0.1 * sum(lengths)


def test_plan_without_budget_is_one_micro_batch():
    assert len(packing.plan([5, 9, 3], "rows", row_tokens=8)) == 1
    assert packing.plan([5, 9, 3], "rows", row_tokens=8)[0].width == 9  # a datum wider than row_tokens sets the width


def test_plan_rejects_unknown_layout():
    with pytest.raises(ValueError, match="unknown layout"):
        packing.plan([3], "diagonal")


# --------------------------------------------------------------------------- equality, float64

# Lengths around the row width (16): exactly at, one below and one above the edge, mixed with short ones.
EDGE_LENGTHS = [16, 15, 17, 1, 8, 8, 16, 3, 31, 2]


@pytest.mark.parametrize("layout", packing.LAYOUTS)
def test_layouts_equal_datum_by_datum(service, tiny_model_path, layout):
    client = client_for(service, tiny_model_path, layout=layout, row_tokens=16)
    data = [rl_datum(n, seed, client.vocab_size) for seed, n in enumerate(EDGE_LENGTHS)]
    assert_equal(*run(client, data), *reference(client, data))


@pytest.mark.parametrize("layout", packing.LAYOUTS)
def test_micro_batches_equal_one_shot(service, tiny_model_path, layout):
    data = [rl_datum(n, seed, 300) for seed, n in enumerate(EDGE_LENGTHS)]
    one_shot = client_for(service, tiny_model_path, layout=layout, row_tokens=16)
    split = client_for(service, tiny_model_path, layout=layout, row_tokens=16, max_tokens_per_micro_batch=32)
    assert len(split.forward_pass.plan([d.model_input.length for d in data])) >= 4
    a, a_grads = run(one_shot, data)
    b, b_grads = run(split, data)
    assert b.metrics.keys() == a.metrics.keys()
    for key in a.metrics:
        assert b.metrics[key] == pytest.approx(a.metrics[key], rel=1e-10, abs=1e-12), key
    assert_equal(b, b_grads, _as_singles(a), a_grads)


def _as_singles(out):
    """One output per datum, so assert_equal can compare a batch with a batch."""
    loss = out.metrics["loss:sum"]
    return [types.ForwardBackwardOutput(out.loss_fn_output_type, [o], {"loss:sum": loss if i == 0 else 0.0})
            for i, o in enumerate(out.loss_fn_outputs)]


def test_custom_loss_over_micro_batches_equals_one_shot(service, tiny_model_path):
    data = [rl_datum(n, seed, 300) for seed, n in enumerate(EDGE_LENGTHS)]

    def loss_fn(batch, logprobs):
        # not a token sum: a per-datum mean, squared, couples every token of a datum
        total = sum((lp * d.loss_fn_inputs["advantages"].to_torch().double()).mean() ** 2 for d, lp in zip(batch, logprobs))
        return total, {"n": float(len(batch))}

    results = []
    for budget in (0, 24):
        client = client_for(service, tiny_model_path, row_tokens=16, max_tokens_per_micro_batch=budget)
        client.model.zero_grad(set_to_none=True)
        results.append((client.forward_backward_custom(data, loss_fn).result(), grads(client)))
    (a, a_grads), (b, b_grads) = results
    assert b.metrics["loss:sum"] == pytest.approx(a.metrics["loss:sum"], rel=1e-10) and b.metrics["n"] == len(data)
    for x, y in zip(a.loss_fn_outputs, b.loss_fn_outputs):
        np.testing.assert_allclose(x["logprobs"].to_numpy(), y["logprobs"].to_numpy(), atol=1e-9)
    for name in a_grads:
        torch.testing.assert_close(b_grads[name], a_grads[name], rtol=1e-9, atol=1e-12)


def test_chunked_head_equals_one_piece(service, tiny_model_path, monkeypatch):
    data = [rl_datum(n, seed, 300) for seed, n in enumerate(EDGE_LENGTHS)]
    client = client_for(service, tiny_model_path)
    whole = run(client, data)
    # A budget of 7 tokens' worth of logits: chunks of 7, recomputed in backward.
    monkeypatch.setattr(forward, "LOGITS_BUDGET_BYTES", 7 * 4 * client.vocab_size)
    chunked = run(client, data)
    assert_equal(*chunked, _as_singles(whole[0]), whole[1])


def test_gradient_checkpointing_equals_plain(service, tiny_model_path):
    data = [rl_datum(n, seed, 300) for seed, n in enumerate(EDGE_LENGTHS)]
    plain = run(client_for(service, tiny_model_path), data)
    ckpt_client = client_for(service, tiny_model_path, gradient_checkpointing=True)
    ckpt = run(ckpt_client, data)
    assert_equal(*ckpt, _as_singles(plain[0]), plain[1])
    assert any(getattr(m, "gradient_checkpointing", False) for m in ckpt_client.model.modules())


def test_failed_micro_batch_leaves_gradients_as_they_were(service, tiny_model_path, monkeypatch):
    data = [rl_datum(n, seed, 300) for seed, n in enumerate(EDGE_LENGTHS)]
    client = client_for(service, tiny_model_path, max_tokens_per_micro_batch=32)
    _, before = run(client, data[:2])
    real = client.forward_pass.logprobs
    calls = []

    def fail_on_third(*args):  # a test double for a failure (say, out of memory) mid-batch
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("simulated failure in micro-batch 3")
        return real(*args)

    monkeypatch.setattr(client.forward_pass, "logprobs", fail_on_third)
    with pytest.raises(RuntimeError, match="micro-batch 3"):
        client.forward_backward(data, LOSS).result()
    after = grads(client)
    for name in before:
        torch.testing.assert_close(after[name], before[name], rtol=0, atol=0)


def test_bad_input_is_refused_before_any_micro_batch(service, tiny_model_path):
    client = client_for(service, tiny_model_path, max_tokens_per_micro_batch=32)
    data = [rl_datum(n, seed, 300) for seed, n in enumerate(EDGE_LENGTHS)]
    bad = data[-1].loss_fn_inputs["advantages"].to_numpy().copy()
    bad[0] = np.nan
    data[-1] = types.Datum(model_input=data[-1].model_input, loss_fn_inputs={**data[-1].loss_fn_inputs, "advantages": bad})
    client.model.zero_grad(set_to_none=True)
    with pytest.raises(ValueError, match="NaN"):
        client.forward_backward(data, LOSS).result()
    assert not grads(client)


# --------------------------------------------------------------------------- sliding windows


@pytest.fixture(scope="module")
def sliding_model(tmp_path_factory, tiny_model_path):
    """A tiny Mistral whose sliding window (6) is shorter than the datums."""
    from transformers import AutoTokenizer, MistralConfig, MistralForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_path)
    config = MistralConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=2, num_key_value_heads=1, head_dim=32, sliding_window=6,
                           max_position_embeddings=256, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("mistral-sliding")
    MistralForCausalLM(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return str(out)


@pytest.mark.parametrize("layout", packing.LAYOUTS)
def test_sliding_window_is_kept_in_every_layout(service, sliding_model, layout):
    client = client_for(service, sliding_model, layout=layout, row_tokens=16)
    data = [rl_datum(n, seed, client.vocab_size) for seed, n in enumerate([15, 9, 4, 12])]
    out = client.forward(data, LOSS).result()
    config = client.model.get_base_model().config
    for datum, got in zip(data, out.loss_fn_outputs):
        want = hf_logprobs(client, datum)  # the model's own forward, with its own sliding-window mask
        np.testing.assert_allclose(got["logprobs"].to_numpy(), want, atol=1e-9)
    # and the window matters at these lengths: without it the 15-token datum scores differently
    config.sliding_window = None
    try:
        unwindowed = hf_logprobs(client, data[0])
    finally:
        config.sliding_window = 6
    assert np.abs(unwindowed - out.loss_fn_outputs[0]["logprobs"].to_numpy()).max() > 1e-6


def hf_logprobs(client, datum):
    ids = torch.tensor([datum.model_input.to_ints()])
    with torch.no_grad():
        logits = client.model(input_ids=ids).logits[0]
    return torch.log_softmax(logits, -1).gather(-1, datum.loss_fn_inputs["target_tokens"].to_torch()[:, None])[:, 0].numpy()


# --------------------------------------------------------------------------- dtypes


def test_bf16_base_keeps_lora_and_adam_in_float32(service, tiny_model_path):
    client = service.create_lora_training_client(tiny_model_path, rank=4, seed=0, dtype="bfloat16")
    lora = {n: p for n, p in client.model.named_parameters() if p.requires_grad}
    assert lora and all(p.dtype == torch.float32 for p in lora.values())
    assert client.model.get_base_model().get_input_embeddings().weight.dtype == torch.bfloat16
    data = [rl_datum(n, seed, client.vocab_size) for seed, n in enumerate([9, 5])]
    out = client.forward_backward(data, LOSS).result()
    assert np.isfinite(out.metrics["loss:sum"])
    client.optim_step(types.AdamParams(learning_rate=1e-3)).result()
    states = list(client.optimizer.state.values())
    assert states and all(s["exp_avg"].dtype == torch.float32 for s in states)


def test_varlen_self_check_agrees_with_sdpa():
    """The check the learner runs before it uses varlen attention on a GPU (here: its CPU path)."""
    from rlpipe.training import attention

    assert attention.varlen_matches_sdpa(torch.device("cpu"), torch.float32)
