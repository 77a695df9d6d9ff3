"""learner.backend = "local": the learner's client over a TrainingClient in this process.

The learner calls one client, whichever backend trains (this one, or TinkerTrainingClient
in pipeline/tinker/training.py, over the tinker SDK):

    step, get_tokenizer()                    optimizer steps taken; the model's tokenizer
    forward, forward_backward, optim_step    Tinker's primitives (futures), for the step and nll_eval
    start_from(path, with_optimizer)         once, first: load a checkpoint (None: the fresh
                                             adapter), and give the other ranks this one's state
    publish(version)                         a future of the WeightUpdate fields of the adapter as
                                             it is after the calls made so far
    checkpoint(name) -> path                 a durable checkpoint; prune_checkpoints(keep_newest, keep)
    evaluate(step, items)                    greedy accuracy of the current weights on eval items
    close()

Here: the adapter's bytes go in the WeightUpdate, checkpoints are directories under
run_dir/learner/state, and evaluation samples with a local engine (learner.eval_sampler).
"""

from __future__ import annotations

from pathlib import Path

from rlpipe.pipeline.distributed import Ranks
from rlpipe.training import checkpoint
from rlpipe.training.client import TrainingClient
from rlpipe.types import LoraConfig


class LocalTrainingClient:
    def __init__(self, config, lora: LoraConfig, learner_dir: Path, ranks: Ranks, device: str):
        lc = config.learner
        self.config, self.dir, self.ranks = config, Path(learner_dir), ranks
        self.training = TrainingClient(config.model_path(), lora, self.dir, device=device or None,
                                       dtype=lc.dtype or None, layout=lc.layout or None,
                                       max_tokens_per_micro_batch=lc.max_tokens_per_micro_batch,
                                       gradient_checkpointing=lc.gradient_checkpointing, place=ranks.place)
        """The TrainingClient itself (its model, optimizer, trainable_state, ...)."""

    # ------------------------------------------------------------------ Tinker's primitives

    @property
    def step(self) -> int:
        return self.training.step

    def get_tokenizer(self):
        return self.training.get_tokenizer()

    def forward(self, *args, **kwargs):
        return self.training.forward(*args, **kwargs)

    def forward_backward(self, *args, **kwargs):
        return self.training.forward_backward(*args, **kwargs)

    def optim_step(self, *args, **kwargs):
        return self.training.optim_step(*args, **kwargs)

    # ------------------------------------------------------------------ what the learner does with them

    def start_from(self, path: str | None, with_optimizer: bool) -> None:
        if path is not None:
            load = self.training.load_state_with_optimizer if with_optimizer else self.training.load_state
            load(path).result()
        self.ranks.attach(self.training)  # the other ranks start from this rank's adapter and optimizer state

    def publish(self, version: int) -> _AdapterFields:
        # In the base's dtype (bfloat16 on CUDA, float32 on the CPU), not the float32 peft keeps
        # LoRA weights in for the optimizer: the sampler computes in the base's dtype, so vLLM
        # casts the adapter to it when it loads it anyway, and float32 would only double the
        # bytes sent, written and loaded. The checkpoints keep float32 (save_state), for resume.
        return _AdapterFields(self.training.get_sampler_weights(dtype=self.training.dtype))

    def checkpoint(self, name: str) -> str:
        path = self.training.save_state(name).result().path
        checkpoint.fsync_tree(path)
        return path

    def prune_checkpoints(self, keep_newest: int, keep: str) -> list[str]:
        return checkpoint.prune_dirs(self.dir / "state", "step-", keep_newest, keep=Path(keep).name)

    def evaluate(self, step: int, items) -> dict[str, float]:
        from rlpipe.evaluators import greedy_eval

        cfg = self.config
        path = self.training.save_weights_for_sampler(f"eval-{step:06d}").result().path
        checkpoint.prune_dirs(Path(path).parent, "eval-", cfg.learner.keep_checkpoints, keep=Path(path).name)
        options = {}
        if cfg.learner.eval_sampler == "local" and self.training.device.type != "cpu":
            options["device"] = "cpu"  # no second copy of the model on the learner's GPU
        return greedy_eval(cfg.model_path(), path, items, self.get_tokenizer(), max_tokens=cfg.explorer.max_tokens,
                           backend=cfg.learner.eval_sampler, policy_version=step, **options)

    def close(self) -> None:
        self.training.close()


class _AdapterFields:
    """The WeightUpdate fields of a future of the adapter's files (TrainingClient.get_sampler_weights)."""

    def __init__(self, files):
        self.files = files

    def done(self) -> bool:
        return self.files.done()

    def result(self, timeout: float | None = None) -> dict[str, bytes]:
        files = self.files.result(timeout)
        return {"adapter_config": files[checkpoint.ADAPTER_CONFIG], "adapter_weights": files[checkpoint.ADAPTER_WEIGHTS]}
