"""The RL algorithm in one synchronous loop: what the pipeline does, without the pipeline.

    python -m rlpipe.loop                                  # the embedded model, in this process
    python -m rlpipe.loop --base-url http://127.0.0.1:8000 # the same through the tinker SDK (rlpipe serve)

Each step samples a batch of groups from the current weights, turns the trajectories into
datums and takes one optimizer step on them. The pipeline (rlpipe run) runs the same pieces
(rlpipe.rollouts.do_group, rlpipe.datums.group_datums, forward_backward + optim_step) in
separate processes, so that sampling the next batch does not wait for this step's training;
with max_staleness = 0 it trains exactly this.
"""

from __future__ import annotations

import argparse
import asyncio
import time

from rlpipe.datums import batch_metrics, group_datums
from rlpipe.rollouts import do_group
from rlpipe.types import AdamParams, SamplingParams, TrajectoryGroup


def trainable(group: TrajectoryGroup) -> bool:
    """A group teaches something only if it finished and its rewards differ: advantages are
    rewards minus the group mean, so equal rewards give every token an advantage of 0."""
    return not group.failed and len({t.reward for t in group.trajectories}) > 1


def train_step(client, groups: list[TrajectoryGroup], step: int, adam: AdamParams,
               loss_fn: str = "importance_sampling", loss_config: dict | None = None) -> dict:
    """One optimizer step on a batch of groups; its metrics."""
    # Token-in, token-out: the datums are the sampled tokens with their sampling logprobs and
    # advantages, never re-tokenized text. Advantages are divided by the batch's action tokens,
    # so the summed loss is a per-token mean whatever the batch's length.
    data = group_datums(groups)
    # Both calls go out before either is awaited: a client runs them in order, and a remote one
    # (Tinker) gets them without a round trip in between.
    loss = client.forward_backward(data, loss_fn, loss_config)
    optim = client.optim_step(adam)
    return {"step": step + 1, **batch_metrics(groups, step), **loss.result().metrics, **optim.result().metrics}


async def rl_loop(client, dataset, *, steps: int, learning_rate: float, max_tokens: int = 16,
                  temperature: float = 1.0, max_turns: int = 8, loss_fn: str = "importance_sampling",
                  grad_clip_norm: float = 1.0, log=print) -> list[dict]:
    """Train client (a TrainingClient, or an SDKTrainingClient on a Tinker endpoint) for steps
    batches of dataset (an RLDataset: get_batch(i) -> group builders). Returns one metrics dict
    per step, as metrics.jsonl holds them."""
    adam = AdamParams(learning_rate=learning_rate, grad_clip_norm=grad_clip_norm)
    params = SamplingParams(max_tokens=max_tokens, temperature=temperature)
    # The learner scores sampled tokens at the sampling temperature, so the importance ratio
    # compares like with like.
    loss_config = {"temperature": temperature} if temperature != 1.0 else None
    records = []
    for step in range(steps):
        start = time.time()
        # The weights every token of this batch is sampled from: version `step`. Being
        # synchronous, the loop trains them at the same version (on-policy: ratio 1 up to
        # numerics); the pipeline trains them up to max_staleness versions later.
        sampler = client.save_weights_and_get_sampling_client(f"step-{step:06d}")
        groups = await asyncio.gather(*(do_group(builder, lambda: sampler, params, max_turns=max_turns)
                                        for builder in dataset.get_batch(step)))
        # A failed group (its env raised or timed out) is reported, and groups without signal
        # are left out as the buffer leaves them out (buffer.drop_constant_reward_groups).
        for group in groups:
            if group.failed:
                log(f"step {step + 1}: a group failed: {group.error}")
        kept = [g for g in groups if trainable(g)]
        if not kept:
            log(f"step {step + 1}: no group carried a signal; nothing to train on")
            continue
        record = train_step(client, kept, step, adam, loss_fn, loss_config)
        record.update({"groups/kept": len(kept), "groups/sampled": len(groups), "time/step_s": time.time() - start})
        records.append(record)
        log(f"step {record['step']}/{steps}: reward {record['reward/mean']:.3f}, loss {record['loss:sum']:.4f}, "
            f"{len(kept)}/{len(groups)} groups kept, {record['time/step_s']:.1f} s")
    return records


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="a local HF model directory (default: the embedded model)")
    parser.add_argument("--base-url", default=None, help="a Tinker endpoint (rlpipe serve) to train and sample on")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--groups", type=int, default=4, help="groups per batch")
    parser.add_argument("--group-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    from envs.toy import DigitsDataset  # a reward even an untrained model earns: no warm-up needed

    if args.model is None:
        from rlpipe.testing.embedded import default_model_path

        args.model = str(default_model_path())
    if args.base_url:
        import tinker

        from rlpipe.training.sdk import SDKTrainingClient

        service = tinker.ServiceClient(base_url=args.base_url)
        client = SDKTrainingClient(service.create_lora_training_client(base_model=args.model, rank=args.rank,
                                                                       seed=args.seed).result())
    else:
        from rlpipe.training.service import ServiceClient

        client = ServiceClient("runs/loop").create_lora_training_client(args.model, rank=args.rank, seed=args.seed)
    dataset = DigitsDataset(client.get_tokenizer(), groups_per_batch=args.groups, group_size=args.group_size)
    return asyncio.run(rl_loop(client, dataset, steps=args.steps, learning_rate=args.lr))


if __name__ == "__main__":
    main()
