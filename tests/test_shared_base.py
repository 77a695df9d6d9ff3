"""Several TrainingClients (LoRA adapters) on one SharedBase: one copy of the base weights,
each adapter trained exactly as if it had the model to itself."""

import numpy as np
import torch

from rlpipe import types
from rlpipe.training.client import TrainingClient
from rlpipe.training.lora import SharedBase
from tests.test_training import ADAM, TEXTS, sft_datum


def _lora(seed, **flags):
    return types.LoraConfig(rank=4, seed=seed, **flags)


def _logprobs(client, data):
    return [o["logprobs"].to_numpy() for o in client.forward(data, "cross_entropy").result().loss_fn_outputs]


def test_shared_clients_match_private_ones_and_do_not_touch_each_other(tiny_model_path, tmp_path):
    base = SharedBase(tiny_model_path)
    a = TrainingClient(tiny_model_path, _lora(1), tmp_path / "a", shared=base)
    b = TrainingClient(tiny_model_path, _lora(2, train_mlp=False), tmp_path / "b", shared=base)
    alone = TrainingClient(tiny_model_path, _lora(1), tmp_path / "alone")
    data = [sft_datum(a.get_tokenizer(), t) for t in TEXTS]
    b_before = _logprobs(b, data)
    # Interleave: a's gradient must survive b's forward_backward and optim_step in between.
    a.forward_backward(data, "cross_entropy")
    b.forward_backward(data[:2], "cross_entropy")
    b.optim_step(ADAM)
    a.optim_step(ADAM).result()
    alone.forward_backward(data, "cross_entropy")
    alone.optim_step(ADAM).result()
    for name, value in alone.trainable_state().items():
        torch.testing.assert_close(a.trainable_state()[name], value, rtol=0, atol=1e-6)
    b_after = _logprobs(b, data)
    assert any(not np.allclose(x, y) for x, y in zip(b_before, b_after))  # b did train
    # ... on its own adapter only (no MLP LoRA there), while a's kept a's shape.
    assert not any("mlp" in k for k in b.trainable_state()) and any("mlp" in k for k in a.trainable_state())
    # One copy of the base: both adapters sit on the very same base tensors.
    embed_a = a.model.get_base_model().get_input_embeddings().weight
    embed_b = b.model.get_base_model().get_input_embeddings().weight
    assert embed_a.data_ptr() == embed_b.data_ptr()
    b.close()
    assert b.adapter is None and len(base.model.peft_config) == 1
    np.testing.assert_array_equal(_logprobs(a, data)[0], _logprobs(a, data)[0])
    base.close()
    alone.close()


def test_save_and_load_state_round_trip_between_shared_clients(tiny_model_path, tmp_path):
    base = SharedBase(tiny_model_path)
    a = TrainingClient(tiny_model_path, _lora(3), tmp_path / "a", shared=base)
    data = [sft_datum(a.get_tokenizer(), t) for t in TEXTS]
    a.forward_backward(data, "cross_entropy")
    a.optim_step(ADAM)
    path = a.save_state("s1").result().path
    b = TrainingClient(tiny_model_path, _lora(4), tmp_path / "b", shared=base)
    b.load_state_with_optimizer(path).result()
    for name, value in a.trainable_state().items():
        assert torch.equal(b.trainable_state()[name], value)
    a.forward_backward(data, "cross_entropy")
    b.forward_backward(data, "cross_entropy")
    a.optim_step(ADAM)
    b.optim_step(ADAM).result()
    for name, value in a.trainable_state().items():
        torch.testing.assert_close(b.trainable_state()[name], value, rtol=0, atol=1e-6)
    base.close()
