"""A short supervised warm-up before RL, shared by the demo and the RL recipes.

RL from a model that never gets a reward learns nothing (every group is dropped as having
no signal), so the recipes first teach the output format with cross-entropy."""

from __future__ import annotations

from typing import Callable

from rlpipe.pipeline.config import RunConfig
from rlpipe.types import AdamParams, Datum


def sft_warm_up(config: RunConfig, make_data: Callable[[object], list[Datum]], steps: int,
                batch_size: int = 32, learning_rate: float | None = None) -> str:
    """`steps` cross-entropy steps on make_data(tokenizer) at learning_rate (default: the LoRA
    rule-of-thumb LR), with the run's LoRA rank and seed; returns the save_state path to put
    in config.learner.init_from.
    A step that fails (a bad datum, say) raises."""
    from rlpipe.training.hyperparams import get_lr
    from rlpipe.training.service import ServiceClient
    from rlpipe.training.sft import sft_steps

    model = config.model_path()
    client = ServiceClient(config.run_dir / "sft").create_lora_training_client(model, rank=config.learner.rank, seed=config.seed)
    data = make_data(client.get_tokenizer())
    sft_steps(client, data, steps, batch_size, AdamParams(learning_rate=learning_rate or get_lr(model), grad_clip_norm=1.0), config.seed)
    return client.save_state("warmup").result().path
