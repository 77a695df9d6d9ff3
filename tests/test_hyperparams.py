import math

import pytest

from rlpipe.hyperparams import get_lr


def test_lr_rule_matches_formula(tiny_model_path):
    # Llama-3.2-1B has hidden size 2000-ish (2048): LoRA LR close to 10 x 5e-5.
    assert get_lr("meta-llama/Llama-3.2-1B", hidden_size=2048) == pytest.approx(5e-4 * (2000 / 2048) ** 0.781)
    assert get_lr("Qwen/Qwen3-8B", hidden_size=4096) == pytest.approx(5e-4 * (2000 / 4096) ** 0.0775)
    assert get_lr("meta-llama/Llama-3.1-8B", hidden_size=4096, is_lora=False) == pytest.approx(5e-5 * (2000 / 4096) ** 0.781)
    tiny = get_lr(tiny_model_path)  # hidden size and family read from config.json
    assert tiny == pytest.approx(5e-4 * (2000 / 128) ** 0.781)
    assert math.isfinite(tiny) and tiny > get_lr("llama", hidden_size=4096)


def test_lr_rule_refuses_unknown_models():
    with pytest.raises(ValueError, match="hidden size"):
        get_lr("some/model")
    with pytest.raises(ValueError, match="no LR exponent"):
        get_lr("some/model", hidden_size=1024)
