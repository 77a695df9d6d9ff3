import json
import logging
import math

import pytest

from rlpipe.training.hyperparams import get_lr

LLAMA, QWEN = 0.781, 0.0775


def model_dir(tmp_path, name: str, **config) -> str:
    """A local model directory holding only a config.json (all get_lr reads)."""
    path = tmp_path / name
    path.mkdir()
    (path / "config.json").write_text(json.dumps(config))
    return str(path)


def test_lr_rule_matches_formula(tiny_model_path):
    # Llama-3.2-1B has hidden size 2000-ish (2048): LoRA LR close to 10 x 5e-5.
    assert get_lr("meta-llama/Llama-3.2-1B", hidden_size=2048, family="llama") == pytest.approx(5e-4 * (2000 / 2048) ** LLAMA)
    assert get_lr("Qwen/Qwen3-8B", hidden_size=4096, family="qwen") == pytest.approx(5e-4 * (2000 / 4096) ** QWEN)
    assert get_lr("meta-llama/Llama-3.1-8B", hidden_size=4096, family="llama", is_lora=False) == pytest.approx(5e-5 * (2000 / 4096) ** LLAMA)
    tiny = get_lr(tiny_model_path)  # hidden size and model_type (llama) read from config.json
    assert tiny == pytest.approx(5e-4 * (2000 / 128) ** LLAMA)
    assert math.isfinite(tiny) and tiny > get_lr("x", hidden_size=4096, family="llama")


@pytest.mark.parametrize("model_type, exponent", [
    ("llama", LLAMA), ("mistral", LLAMA), ("qwen2", QWEN), ("qwen3", QWEN), ("qwen2_moe", QWEN), ("qwen3_moe", QWEN),
])
def test_family_comes_from_model_type_not_the_path(tmp_path, model_type, exponent, caplog):
    # The directory names point at the other family: only model_type may decide.
    misleading = "qwen-finetune" if exponent == LLAMA else "llama-distill"
    path = model_dir(tmp_path, misleading, model_type=model_type, hidden_size=1024)
    with caplog.at_level(logging.WARNING, logger="rlpipe.training.hyperparams"):
        assert get_lr(path) == pytest.approx(5e-4 * (2000 / 1024) ** exponent)
    assert not caplog.records


def test_unknown_family_falls_back_with_a_warning(tmp_path, caplog):
    path = model_dir(tmp_path, "qwen-named-gemma", model_type="gemma2", hidden_size=2304)
    with caplog.at_level(logging.WARNING, logger="rlpipe.training.hyperparams"):
        lr = get_lr(path)
    assert lr == pytest.approx(5e-4 * (2000 / 2304) ** LLAMA)  # the documented fallback, not Qwen's
    assert "gemma2" in caplog.text and "llama" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="rlpipe.training.hyperparams"):
        assert get_lr("Qwen/Qwen3-8B", hidden_size=4096) == pytest.approx(5e-4 * (2000 / 4096) ** LLAMA)  # a bare name: no model_type
    assert "None" in caplog.text


def test_multimodal_config_and_explicit_model_type(tmp_path):
    path = model_dir(tmp_path, "vl", model_type="qwen2_5_vl", text_config={"hidden_size": 3584})
    assert get_lr(path, family="qwen2") == pytest.approx(5e-4 * (2000 / 3584) ** QWEN)


def test_lr_rule_needs_a_hidden_size(tmp_path):
    with pytest.raises(ValueError, match="hidden size"):
        get_lr("some/model")
    with pytest.raises(ValueError, match="hidden size"):
        get_lr(model_dir(tmp_path, "m", model_type="llama"))
