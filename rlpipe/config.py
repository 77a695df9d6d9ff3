"""Typed run configuration, read from TOML. Every field is documented where it is declared;
unknown keys are errors, so a typo never silently falls back to a default.

    name = "arith"
    max_staleness = 1
    [dataset]
    factory = "envs.arithmetic:ArithmeticDataset"
    args = { group_size = 8, difficulty = 2 }
    [learner]
    steps = 40
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from typing import Any, Literal

import msgspec


class Config(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    pass


class DatasetConfig(Config):
    factory: str = "envs.arithmetic:ArithmeticDataset"
    """"module:callable" called as factory(tokenizer, groups_per_batch=..., **args); it returns an
    RLDataset. The one place a name is looked up: a TOML file cannot hold a Python callable."""
    args: dict[str, Any] = {}
    eval_factory: str = ""
    """Optional "module:callable"(tokenizer, **eval_args) -> list of (prompt ModelInput, grade fn(text) -> bool),
    e.g. "envs.arithmetic:eval_items"; the learner reports greedy accuracy every eval_every steps."""
    eval_args: dict[str, Any] = {}
    nll_eval_factory: str = ""
    """Optional "module:callable"(tokenizer, **nll_eval_args) -> list of cross-entropy Datums
    (held-out text with loss weights), e.g. "envs.arithmetic:answer_datums"; the learner reports
    the per-token NLL (eval/nll) every eval_every steps."""
    nll_eval_args: dict[str, Any] = {}


class ExplorerConfig(Config):
    concurrency: int = 16
    """Groups rolled out at the same time (asyncio tasks sharing one sampler)."""
    sampler: Literal["auto", "vllm", "local"] = "auto"
    """auto = vLLM where installed, else the local torch sampler."""
    temperature: float = 1.0
    top_p: float = 1.0
    max_tokens: int = 32
    """Per policy turn."""
    max_turns: int = 8
    episode_timeout_s: float = 120.0
    """An episode (env and sampler together) running longer fails its group (counted)."""
    scale_by_std: bool = False
    """Divide group-centred advantages by the group's reward std."""
    first_weights_timeout_s: float = 600.0
    """How long to wait for the learner's first adapter before giving up."""
    push_timeout_s: float = 120.0
    """How long a full buffer may block a push before the explorer fails."""


class LearnerConfig(Config):
    steps: int = 40
    rank: int = 16
    loss_fn: Literal["importance_sampling", "ppo", "cispo", "dro"] = "importance_sampling"
    loss_fn_config: dict[str, float] = {}
    """e.g. {clip_low_threshold = 0.8, clip_high_threshold = 1.2} for ppo, {tis_cap = 2.0}."""
    learning_rate: float = 0.0
    """0 = rlpipe.hyperparams.get_lr(base_model)."""
    grad_clip_norm: float = 1.0
    weight_decay: float = 0.0
    sync_interval: int = 1
    """Publish the adapter to the explorers every this many optimizer steps."""
    checkpoint_every: int = 10
    eval_every: int = 0
    """Run the evaluators every this many steps (0 = never): the sampling evaluator if
    dataset.eval_factory is set, the NLL evaluator if dataset.nll_eval_factory is set."""
    eval_sampler: Literal["auto", "vllm", "local"] = "local"
    """The learner's own sampler for evaluations (greedy); local avoids a second vLLM engine."""
    batch_timeout_s: float = 600.0
    """How long the learner waits for one batch before it fails with a clear error."""
    cpu_threads: int = 0
    """torch threads of the learner. 0 = auto: on a host without a GPU, half the cores (the
    sampler runs on the same cores; oversubscribing them made a learner step 7x slower on
    2 cores), torch's default elsewhere."""
    init_from: str = ""
    """Optional save_state checkpoint to start from (weights only), e.g. an SFT warm-up."""


class BufferConfig(Config):
    drop_constant_reward_groups: bool = True
    """Groups whose rewards are all equal carry no signal with centred advantages: the buffer
    drops them (counted as no_signal) and the explorer rolls out others in their place."""


class Addresses(Config):
    """ZeroMQ endpoints. The buffer binds experience and batches, the learner binds control."""

    experience: str = "tcp://127.0.0.1:5601"
    batches: str = "tcp://127.0.0.1:5602"
    control: str = "tcp://127.0.0.1:5603"


class RunConfig(Config):
    name: str = "run"
    base_model: str = ""
    """A local Hugging Face model directory; "" = the embedded tiny model."""
    runs_dir: str = "runs"
    """Everything of the run goes to runs_dir/name: metrics.jsonl, checkpoints, buffer log."""
    seed: int = 0
    max_staleness: int = 1
    """A group sampled with policy version v is trained at learner version u only if
    u - v <= max_staleness; 0 is synchronous RL (sample, train, sync, repeat)."""
    groups_per_batch: int = 8
    dataset: DatasetConfig = msgspec.field(default_factory=DatasetConfig)
    explorer: ExplorerConfig = msgspec.field(default_factory=ExplorerConfig)
    learner: LearnerConfig = msgspec.field(default_factory=LearnerConfig)
    buffer: BufferConfig = msgspec.field(default_factory=BufferConfig)
    addresses: Addresses = msgspec.field(default_factory=Addresses)

    @property
    def run_dir(self) -> Path:
        return Path(self.runs_dir) / self.name

    def model_path(self) -> str:
        if self.base_model:
            return self.base_model
        from rlpipe.tiny import default_model_path

        return str(default_model_path())


def vocab_size(model_path: str) -> int:
    config = json.loads((Path(model_path) / "config.json").read_text())
    return int(config.get("vocab_size") or config["text_config"]["vocab_size"])


def check(config: RunConfig) -> RunConfig:
    if config.max_staleness < 0:
        raise ValueError("max_staleness must be >= 0")
    if config.learner.sync_interval < 1:
        raise ValueError("learner.sync_interval must be >= 1")
    if config.max_staleness < config.learner.sync_interval - 1:
        # Weights only move every sync_interval steps; a tighter bound would stall the explorer.
        raise ValueError(
            f"max_staleness ({config.max_staleness}) must be >= learner.sync_interval - 1 "
            f"({config.learner.sync_interval - 1}), or the explorer waits for weights that never come"
        )
    if config.groups_per_batch < 1 or config.explorer.concurrency < 1:
        raise ValueError("groups_per_batch and explorer.concurrency must be >= 1")
    return config


def load(path: str | Path, overrides: dict[str, Any] | None = None) -> RunConfig:
    """Read a TOML config (or the JSON a run writes next to its metrics), apply dotted
    overrides such as {"learner.steps": 20}, and check it."""
    data = Path(path).read_bytes()
    raw = msgspec.json.decode(data) if str(path).endswith(".json") else msgspec.toml.decode(data)
    for dotted, value in (overrides or {}).items():
        node = raw
        *parents, leaf = dotted.split(".")
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    try:
        return check(msgspec.convert(raw, RunConfig))
    except msgspec.ValidationError as err:
        raise ValueError(f"{path}: {err}") from None


def dump(config: RunConfig) -> bytes:
    """JSON, written next to the run's metrics so a run records exactly what it ran with."""
    return msgspec.json.format(msgspec.json.encode(config))


def import_callable(spec: str):
    module, _, name = spec.partition(":")
    if not module or not name:
        raise ValueError(f"expected 'module:callable', got {spec!r}")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"cannot load {spec!r}: {err}") from None
