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

scheduled_lr turns that rate into the rate of each step (learner.lr_schedule).
"""

from __future__ import annotations

import json
import logging
import math
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


LR_SCHEDULES = ("constant", "cosine")


def scheduled_lr(step: int, lr: float, *, schedule: str = "constant", warmup_steps: int = 0, total_steps: int = 0,
                 min_ratio: float = 0.0) -> float:
    """The learning rate of update number `step` (0 = the first) under a schedule peaking at lr.

    Warm-up (either schedule): the first warmup_steps updates climb a line from 0, update k
    taking lr * (k + 1) / warmup_steps, so the last of them is at lr and none is wasted at 0.
    Then "constant" stays at lr, and "cosine" falls along half a cosine from lr to
    min_ratio * lr, reaching it at step total_steps: the update after the last one of a run
    of total_steps, as transformers' cosine schedule does (the last update is just above it)."""
    if schedule not in LR_SCHEDULES:
        raise ValueError(f"unknown learning-rate schedule {schedule!r}; choose one of {LR_SCHEDULES}")
    if step < 0 or warmup_steps < 0:
        raise ValueError(f"step and warmup_steps must be >= 0, got {step} and {warmup_steps}")
    if not 0.0 <= min_ratio <= 1.0:
        raise ValueError(f"min_ratio must be in [0, 1], got {min_ratio}")
    if schedule == "cosine" and total_steps < 1:
        raise ValueError(f"the cosine schedule needs total_steps >= 1, got {total_steps}")
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    if schedule == "constant":
        return lr
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return lr * (min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress)))
