"""ServiceClient: where training and sampling clients come from, as in Tinker."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

from rlpipe.training import checkpoint
from rlpipe.training.client import TrainingClient
from rlpipe.types import LoraConfig


class ServiceClient:
    def __init__(self, checkpoint_dir: str | os.PathLike | None = None):
        """checkpoint_dir: where save_state / save_weights_for_sampler write; each training
        client gets its own run folder below it. Default $RLPIPE_CHECKPOINT_DIR or ./rlpipe_checkpoints."""
        root = checkpoint_dir or os.environ.get("RLPIPE_CHECKPOINT_DIR", "rlpipe_checkpoints")
        self.checkpoint_dir = Path(root).absolute()

    def _run_dir(self) -> Path:
        return self.checkpoint_dir / f"run-{uuid.uuid4().hex[:8]}"

    def create_lora_training_client(
        self,
        base_model: str,
        rank: int = 32,
        seed: int | None = None,
        train_mlp: bool = True,
        train_attn: bool = True,
        train_unembed: bool = True,
        **options,
    ) -> TrainingClient:
        """options: device, dtype, layout, row_tokens, max_tokens_per_micro_batch, gradient_checkpointing,
        call_timeout_s (see TrainingClient)."""
        lora = LoraConfig(rank=rank, seed=seed, train_mlp=train_mlp, train_attn=train_attn, train_unembed=train_unembed)
        return TrainingClient(str(base_model), lora, self._run_dir(), **options)

    def create_training_client_from_state(self, path: str, **options) -> TrainingClient:
        """A client with the checkpoint's weights; the optimizer starts fresh."""
        return self._from_state(path, with_optimizer=False, **options)

    def create_training_client_from_state_with_optimizer(self, path: str, **options) -> TrainingClient:
        """A client that resumes exactly: weights, optimizer state, step and RNG."""
        return self._from_state(path, with_optimizer=True, **options)

    def _from_state(self, path: str, with_optimizer: bool, **options) -> TrainingClient:
        meta = checkpoint.read_meta(path)
        client = TrainingClient(meta.base_model, meta.lora, self._run_dir(), **options)
        if with_optimizer:
            client.load_state_with_optimizer(path).result()
        else:
            client.load_state(path).result()
        return client

    def create_sampling_client(self, base_model: str, model_path: str | None = None, **options):
        """A SamplingClient on vLLM where installed, else the local torch backend.
        model_path: a PEFT adapter directory (from save_weights_for_sampler) or None for the base."""
        from rlpipe.sampling import create_sampling_client

        return create_sampling_client(str(base_model), model_path=model_path, **options)
