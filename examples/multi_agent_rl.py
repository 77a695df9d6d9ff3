"""Tic-tac-toe self-play through the async pipeline: one group is one game, X and O are both
sampled from the policy being trained, and the group reward is zero-sum.

    python examples/multi_agent_rl.py                   # SFT warm-up, then 30 async RL steps
    python examples/multi_agent_rl.py --sampler local --steps 6 --sft-steps 30

`envs.multi_agent.TicTacToeDataset`: each player's episode is multi-turn (its move, then the
opponent's move and the board come back as observation tokens). `compute_group_rewards`
gives +1 / -1 for a win / loss, 0 for a draw; an illegal or unreadable move loses at once.
Draws and abandoned games give both sides 0: no signal, so the buffer drops them (counted).

What the embedded 0.48M-parameter model can do, honestly: untrained, almost every first move
is unreadable (it does not answer with a cell number), so games end after one move. A short
SFT warm-up on scripted random *legal* games (the env driven with scripted moves, so the
tokens match an episode exactly; loss on the moves only) teaches the move format. RL then
pushes against illegal moves (they lose), which shows as the illegal-move rate falling and
games lasting longer. Strategic play (winning more than chance) is not to be expected.
Limit: the rules and four board reports can exceed the tiny model's 512-token context, so
each player gets 3 turns; a game still running at X's 4th move (move 7) is abandoned (0 for
both, no signal). With a larger base model raise explorer.max_turns to 5.
Metrics to watch, and how to read them: metrics.jsonl describes the *trained* games only,
and draws/abandoned games are dropped before training, so every trained game was decided by
a win or by an illegal move. env/illegal (share of players whose own move was illegal) is
then half the share of trained games ended by an illegal move (exactly 0.5 means none was
won on the board), so env/illegal falling below 0.5, env/moves (game
length) rising, and dropped/no_signal (draws, abandoned games) rising are what progress looks like.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import time
from pathlib import Path

import numpy as np

CONTEXT = 512  # the embedded model's max_position_embeddings


class RandomLegalPlayer:
    """A sampler stand-in for SFT data: plays a random empty cell of its game."""

    def __init__(self, tokenizer, game, rng: random.Random):
        self.tokenizer, self.game, self.rng = tokenizer, game, rng

    async def sample_async(self, prompt, num_samples, sampling_params):
        from rlpipe.types import SampledSequence, SampleResponse

        cell = self.rng.choice([i for i, mark in enumerate(self.game.board) if not mark])
        ids = self.tokenizer(str(cell + 1), add_special_tokens=False)["input_ids"] + [self.tokenizer.eos_token_id]
        return SampleResponse([SampledSequence(stop_reason="stop", tokens=ids, logprobs=[0.0] * len(ids))])


async def scripted_game(tokenizer, rng: random.Random) -> list:
    from envs.multi_agent import TicTacToeGroupBuilder
    from rlpipe.rollouts import do_episode
    from rlpipe.types import SamplingParams

    builder = TicTacToeGroupBuilder(tokenizer)
    envs = await builder.make_envs()
    player = RandomLegalPlayer(tokenizer, builder.game, rng)
    return await asyncio.gather(*(do_episode(env, lambda: player, SamplingParams(), max_turns=5) for env in envs))


def transcripts(tokenizer, n_games: int, seed: int = 0) -> list:
    from rlpipe.datums import datum_from_tokens_weights

    rng = random.Random(seed)
    data = []
    for _ in range(n_games):
        for traj in asyncio.run(scripted_game(tokenizer, rng)):
            assert traj.metrics["illegal"] == 0.0
            if len(traj.tokens) > CONTEXT:  # X's 5-move games do not fit the tiny model
                continue
            data.append(datum_from_tokens_weights(traj.tokens, traj.action_mask))
    return data


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=30, help="RL (learner) steps")
    p.add_argument("--sft-steps", type=int, default=60, help="SFT warm-up steps on scripted games (0 = none)")
    p.add_argument("--runs-dir", default="runs")
    p.add_argument("--name", default="multi_agent_rl")
    p.add_argument("--sampler", choices=("auto", "vllm", "local"), default="auto")
    p.add_argument("--games-per-batch", type=int, default=16, help="groups per batch (one game = one group)")
    p.add_argument("--lr", type=float, default=1e-3)
    return p.parse_args(argv)


def make_config(args):
    from rlpipe import transport
    from rlpipe.config import RunConfig

    config = RunConfig(name=args.name, runs_dir=args.runs_dir, max_staleness=1, groups_per_batch=args.games_per_batch)
    config.dataset.factory = "envs.multi_agent:TicTacToeDataset"
    # The tiny model's context is 512 tokens and a 4th-move prompt can be 516 (the rules and
    # four board reports), so each player gets at most 3 turns. A game that reaches X's 4th
    # move ends when O stops waiting for it (move_timeout_s) and counts as abandoned (0 for both).
    config.dataset.args = {"move_timeout_s": 5.0}
    config.explorer.sampler = args.sampler
    config.explorer.concurrency = args.games_per_batch * 2
    config.explorer.max_turns = 3
    config.explorer.max_tokens = 4  # a move is one digit and the end of the turn
    config.learner.steps = args.steps
    config.learner.learning_rate = args.lr
    config.learner.checkpoint_every = max(args.steps, 1)
    config.addresses.experience, config.addresses.batches, config.addresses.control = (
        f"tcp://127.0.0.1:{transport.free_port()}" for _ in range(3))
    return config


def window(records, key: str, first: bool) -> float:
    k = max(1, len(records) // 4)
    return float(np.mean([r[key] for r in (records[:k] if first else records[-k:])]))


def main(argv=None) -> dict:
    from rlpipe import launch
    from rlpipe.config import dump, load
    from rlpipe.metrics import read_metrics
    from rlpipe.warmup import sft_warm_up

    args = parse_args(argv)
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    config = make_config(args)
    t0 = time.time()
    if args.sft_steps:
        config.learner.init_from = sft_warm_up(config, lambda tok: transcripts(tok, n_games=100), args.sft_steps, batch_size=8)
        print(f"SFT warm-up on scripted legal games: {args.sft_steps} steps ({time.time() - t0:.0f} s)")
    path = Path(config.run_dir) / "multi_agent_rl_config.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(dump(config))
    code = launch.run(load(path), str(path), [])
    if code != 0:
        raise SystemExit(f"the pipeline failed (exit code {code}); see {config.run_dir / 'logs'}")
    records = read_metrics(config.run_dir / "metrics.jsonl")
    out = {"steps": len(records), "run_dir": str(config.run_dir), "seconds": time.time() - t0}
    for key in ("env/illegal", "env/moves", "dropped/no_signal"):
        name = key.split("/")[1]
        records = [{**r, key: r.get(key, 0.0)} for r in records]
        out[f"{name}_first"], out[f"{name}_last"] = window(records, key, True), window(records, key, False)
        print(f"{key:>12}: {out[f'{name}_first']:.3f} -> {out[f'{name}_last']:.3f}  (first vs last quarter of the steps)")
    print(f"total {out['seconds']:.0f} s; everything the run wrote is in {config.run_dir}")
    return out


if __name__ == "__main__":
    main()
