"""One learner rank for tests/test_distributed_learner.py, as torchrun runs it:

    torchrun ... --nproc-per-node N -m tests.distributed_worker OUT START STEPS [LOAD] [SAVE_AT] [STRATEGY]
    (as distributed.local_torchrun starts it)

It trains the learner's way (rlpipe.pipeline.distributed.Ranks: rank 0 steps, the others
follow) on fixed batches, batch i for learner step i (START = the first), two mini-batches per
batch; rank 0 writes each step's adapter, gradient norm and loss to OUT. LOAD: a checkpoint
that rank 0 resumes from (the others get its state from rank 0, as in the learner); SAVE_AT: the
step after which rank 0 writes a checkpoint (OUT/ckpt/state/step-SAVE_AT); STRATEGY: "ddp"
(default) or "fsdp" (the base sharded; each record then also has "held": the share of the
decoder layers' base weights rank 0 holds). Without torchrun,
run() is the 1-process reference: the very code path of a one-process learner.
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

import torch

from rlpipe.datums import group_datums, split_groups
from rlpipe.pipeline.distributed import Ranks, die_with_agent
from rlpipe.testing.embedded import default_model_path
from rlpipe.training.client import TrainingClient
from rlpipe.types import AdamParams, LoraConfig, Trajectory, TrajectoryGroup

LOSS, LOSS_CONFIG = "ppo", {"clip_low_threshold": 0.8, "clip_high_threshold": 1.2}
# Clipping at a norm the batch gradients exceed: the clipped step depends on the summed gradient.
ADAM = AdamParams(learning_rate=2e-2, grad_clip_norm=0.05)
MINIBATCHES = 2


def batch(step: int, vocab: int) -> list[TrajectoryGroup]:
    """Batch `step`: groups of 3, 2 and 1 trajectories of 12..40 tokens. With two mini-batches
    the second is the 1-trajectory group: one datum, so one of two ranks has no share of it."""
    rng = random.Random(1000 + step)
    groups = []
    for g, size in enumerate((3, 2, 1)):
        trajectories = []
        for _ in range(size):
            prompt, answer = rng.randint(4, 12), rng.randint(8, 28)
            n = prompt + answer
            trajectories.append(Trajectory(
                tokens=[rng.randrange(8, vocab) for _ in range(n)], action_mask=[0] * prompt + [1] * answer,
                sampling_logprobs=[0.0] * prompt + [-rng.uniform(3.0, 7.0) for _ in range(answer)],
                policy_versions=[-1] * prompt + [step] * answer, reward=0.0, advantage=rng.uniform(-1.0, 1.0)))
        groups.append(TrajectoryGroup(group_id=f"{step}-{g}", trajectories=trajectories))
    return groups


def make_client(checkpoint_dir: Path, ranks: Ranks) -> TrainingClient:
    # Micro-batches of at most 48 tokens: the ranks' shares take different numbers of them.
    return TrainingClient(str(default_model_path()), LoraConfig(rank=4, seed=0), checkpoint_dir, device="cpu",
                          dtype="float64", max_tokens_per_micro_batch=48, place=ranks.place)


def held_share(client: TrainingClient) -> float:
    """The share of the decoder layers' frozen weights this rank holds (1.0: all of them)."""
    from torch.distributed.tensor import DTensor

    held = total = 0
    for p in client.forward_pass.body.layers.parameters():
        if not p.requires_grad:
            local = p.to_local() if isinstance(p, DTensor) else p
            held, total = held + local.numel(), total + p.numel()
    return held / total


def run(out: Path, start: int, steps: int, load: str = "", save_at: int = 0, strategy: str = "ddp") -> list[dict]:
    """Train steps START+1.. START+STEPS; rank 0 returns (and writes to OUT/steps.json) one record a
    step: {"step", "grad_norm", "loss", "adapter": the path of its torch.save'd LoRA weights}."""
    out.mkdir(parents=True, exist_ok=True)
    ranks = Ranks("cpu", timeout_s=120, strategy=strategy)
    client = make_client(out / "ckpt", ranks)
    try:
        if load and ranks.rank == 0:
            client.load_state_with_optimizer(load).result()
        ranks.attach(client)
        if ranks.rank != 0:
            ranks.follow(client)
            return []
        records = []
        for step in range(start, start + steps):
            minibatches = [group_datums(part) for part in split_groups(batch(step, client.vocab_size), MINIBATCHES)]
            metrics = ranks.step(client, minibatches, LOSS, LOSS_CONFIG, ADAM)
            path = out / f"adapter-{step + 1}.pt"
            torch.save(client.trainable_state(), path)
            records.append({"step": step + 1, "grad_norm": metrics["grad_norm:mean"], "loss": metrics["loss:sum"],
                            "optim_steps": client.step, "adapter": str(path), "held": held_share(client)})
            if step + 1 == save_at:
                client.save_state(f"step-{save_at:06d}").result()
        ranks.stop()
        (out / "steps.json").write_text(json.dumps(records))
        return records
    finally:
        client.close()
        ranks.close()


if __name__ == "__main__":
    die_with_agent()  # no rank outlives torchrun, as in the learner
    torch.set_num_threads(1)  # two ranks on two cores
    out, start, steps, *rest = sys.argv[1:]
    run(Path(out), int(start), int(steps), rest[0] if rest else "", int(rest[1]) if len(rest) > 1 else 0,
        rest[2] if len(rest) > 2 else "ddp")
