"""Learning-rate rule of thumb for LoRA.

LR = base_lr * lora_multiplier * (2000 / hidden_size) ** exponent

with base_lr = 5e-5, lora_multiplier = 10 (LoRA wants about 10x the full fine-tuning LR,
independent of rank when alpha is fixed at 32) and a per-family exponent fitted over model
sizes: 0.781 for Llama, 0.0775 for Qwen. Source: the Tinker documentation's supervised-learning
hyperparameter page and tinker-cookbook's `hyperparam_utils.get_lr`, which rests on the
"LoRA Without Regret" study (Thinking Machines Lab, 2025). It is a starting point for a sweep,
not a guarantee; for RL the same LoRA LR works as a first guess.
"""

from __future__ import annotations

import json
from pathlib import Path

BASE_LR = 5e-5
LORA_MULTIPLIER = 10.0
EXPONENTS = {"llama": 0.781, "qwen": 0.0775}


def get_lr(model: str, *, is_lora: bool = True, hidden_size: int | None = None, family: str | None = None) -> float:
    """Recommended Adam learning rate for `model`: a local HF directory (hidden size and
    family read from config.json) or a name, with hidden_size / family given explicitly."""
    config_file = Path(model) / "config.json"
    config = json.loads(config_file.read_text()) if config_file.exists() else {}
    hidden_size = hidden_size or config.get("hidden_size")
    if not hidden_size:
        raise ValueError(f"cannot find the hidden size of {model!r}: pass hidden_size=")
    family = family or _family(config.get("model_type", "") + " " + model)
    if family not in EXPONENTS:
        raise ValueError(f"no LR exponent for model family {family!r}; known: {sorted(EXPONENTS)}")
    lr = BASE_LR * (LORA_MULTIPLIER if is_lora else 1.0)
    return lr * (2000 / hidden_size) ** EXPONENTS[family]


def _family(text: str) -> str | None:
    text = text.lower()
    return next((name for name in EXPONENTS if name in text), None)
