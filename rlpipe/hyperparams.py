"""Learning-rate rule of thumb for LoRA.

LR = base_lr * lora_multiplier * (2000 / hidden_size) ** exponent

with base_lr = 5e-5, lora_multiplier = 10 (LoRA wants about 10x the full fine-tuning LR,
independent of rank when alpha is fixed at 32) and a per-family exponent fitted over model
sizes: 0.781 for Llama, 0.0775 for Qwen. Source: the Tinker documentation's supervised-learning
hyperparameter page and tinker-cookbook's `hyperparam_utils.get_lr`, which rests on the
"LoRA Without Regret" study (Thinking Machines Lab, 2025). It is a starting point for a sweep,
not a guarantee; for RL the same LoRA LR works as a first guess.

The family comes from the model's config.json `model_type` (never from its name or path: a
fine-tune called "my-llama-distill" may well be a Qwen). Families without a fitted exponent
get the Llama one (FALLBACK_FAMILY: most open dense decoders share Llama's architecture) with
a logged warning, so a learner never fails to start over a rule of thumb; pass family= or set
learner.learning_rate to choose.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

log = logging.getLogger(__name__)

BASE_LR = 5e-5
LORA_MULTIPLIER = 10.0
EXPONENTS = {"llama": 0.781, "qwen": 0.0775}
# config.json model_type -> the family whose exponent it uses
MODEL_TYPES = {"llama": "llama", "mistral": "llama",
               "qwen2": "qwen", "qwen3": "qwen", "qwen2_moe": "qwen", "qwen3_moe": "qwen"}
FALLBACK_FAMILY = "llama"


def get_lr(model: str, *, is_lora: bool = True, hidden_size: int | None = None, family: str | None = None) -> float:
    """Recommended Adam learning rate for `model`: a local HF directory (hidden size and
    model_type read from its config.json) or a name, with hidden_size (and family) given.
    family: "llama", "qwen", or a model_type such as "mistral"; default from config.json."""
    config_file = Path(model) / "config.json"
    config = json.loads(config_file.read_text()) if config_file.exists() else {}
    text = config.get("text_config") or config  # multimodal configs keep the LM's sizes there
    hidden_size = hidden_size or text.get("hidden_size")
    if not hidden_size:
        raise ValueError(f"cannot find the hidden size of {model!r}: pass hidden_size=")
    lr = BASE_LR * (LORA_MULTIPLIER if is_lora else 1.0)
    return lr * (2000 / hidden_size) ** EXPONENTS[model_family(model, family or config.get("model_type"))]


def model_family(model: str, model_type: str | None) -> str:
    """The exponent's family for a model_type (or a family name); unknown ones fall back."""
    if model_type in EXPONENTS:
        return model_type
    if model_type in MODEL_TYPES:
        return MODEL_TYPES[model_type]
    log.warning("no LR exponent fitted for model_type %r of %s; using the %s one (%g). Set the learning "
                "rate yourself (learner.learning_rate) or pass family= to choose", model_type, model,
                FALLBACK_FAMILY, EXPONENTS[FALLBACK_FAMILY])
    return FALLBACK_FAMILY
