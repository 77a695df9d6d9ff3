"""Tic-tac-toe self-play through the async pipeline: one group is one game, X and O are both
sampled from the policy being trained, and the group reward is zero-sum.

    python examples/multi_agent_rl.py                   # SFT warm-up, then 15 async RL steps
    python examples/multi_agent_rl.py --sampler local --steps 30

`envs.multi_agent.TicTacToeDataset`: each player's episode is multi-turn (its move, then the
opponent's move and the board come back as observation tokens). `compute_group_rewards`
gives +1 / -1 for a win / loss, 0 for a draw; an illegal or unreadable move loses at once.
Draws and abandoned games give both sides 0: no signal, so the buffer drops them (counted).

What the embedded 0.48M-parameter model can do, honestly: untrained, almost every move is
unreadable (not a cell number), so games end after one move. Three SFT steps on scripted
random *legal* games (the env driven with scripted moves, so the tokens match an episode
exactly; loss on the moves only) leave about half the moves readable. RL then teaches the
move format from the game result alone: an unreadable move loses at once, and the winner's
moves are reinforced. Measured (64 games at temperature 1, before vs after 15 RL steps of 16
games): unreadable-move share 0.48 -> 0.28, game length 1.4 -> 3.9 moves (local sampler);
0.49 -> 0.13 and 1.3 -> 3.9 with the default vLLM sampler.
What it does not learn: which cells are free. Its readable moves stay as legal as random
digits; even 400 SFT steps on legal games leave ~95% of games ending in a move to an
occupied cell (a 2-layer model does not pick up the board from the rendered text). So
strategy, draws and wins beyond chance are not to be expected; with a real base model they are
the next things to watch.

The figures are measured outside training, before and after RL: --eval-games self-play
games sampled at temperature 1 with the warm-up adapter, then with the learner's last
checkpoint (`rlpipe.evaluators.rollout_eval`). Per player: eval/unreadable and eval/illegal
(this player's move was unreadable / illegal, unreadable included: half the share of games
ended that way), eval/moves (game length). The training metrics (metrics.jsonl) describe the
*trained* games only: draws give both sides 0, carry no signal and are dropped before
training (buffer/dropped_no_signal), so every trained game was decided by a win or an illegal move.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import time
from pathlib import Path

from rlpipe.cli import console

MAX_TURNS = 5  # X moves at most 5 times, O 4; a full game is under 600 tokens


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
    return await asyncio.gather(*(do_episode(env, lambda: player, SamplingParams(), max_turns=MAX_TURNS) for env in envs))


def transcripts(tokenizer, n_games: int, seed: int = 0) -> list:
    from rlpipe.datums import datum_from_tokens_weights

    rng = random.Random(seed)
    data = []
    for _ in range(n_games):
        for traj in asyncio.run(scripted_game(tokenizer, rng)):
            assert traj.metrics["illegal"] == 0.0
            data.append(datum_from_tokens_weights(traj.tokens, traj.action_mask))
    return data


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=15, help="RL (learner) steps")
    p.add_argument("--sft-steps", type=int, default=3, help="SFT warm-up steps on scripted games (0 = none)")
    p.add_argument("--runs-dir", default="runs")
    p.add_argument("--name", default="multi_agent_rl")
    p.add_argument("--sampler", choices=("auto", "vllm", "local"), default="auto")
    p.add_argument("--games-per-batch", type=int, default=16, help="groups per batch (one game = one group)")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--eval-games", type=int, default=64, help="self-play games measured before and after RL")
    p.add_argument("--seed", type=int, default=0, help="added to every seed the recipe uses (0: the documented run)")
    return p.parse_args(argv)


def make_config(args):
    from rlpipe.pipeline import transport
    from rlpipe.pipeline.config import RunConfig

    # config.seed seeds the LoRA init and the warm-up
    config = RunConfig(name=args.name, runs_dir=args.runs_dir, max_staleness=1, groups_per_batch=args.games_per_batch,
                       seed=args.seed)
    config.dataset.factory = "envs.multi_agent:TicTacToeDataset"
    # A player whose episode dies stops moving; its opponent gives up after this long and the
    # game counts as abandoned (0 for both) instead of holding an explorer slot.
    config.dataset.args = {"move_timeout_s": 60.0}
    config.explorer.sampler = args.sampler
    config.explorer.concurrency = args.games_per_batch * 2
    config.explorer.max_turns = MAX_TURNS
    config.explorer.max_tokens = 4  # a move is one digit and the end of the turn
    config.learner.steps = args.steps
    config.learner.learning_rate = args.lr
    config.learner.checkpoint_every = max(args.steps, 1)
    config.addresses.experience, config.addresses.batches, config.addresses.control = (
        f"tcp://127.0.0.1:{transport.free_port()}" for _ in range(3))
    return config


def play_eval(config, adapter: str | None, n_games: int) -> dict[str, float]:
    """n_games self-play games with base model + adapter, nothing trained: mean player metrics."""
    from transformers import AutoTokenizer

    from envs.multi_agent import TicTacToeGroupBuilder
    from rlpipe.evaluators import run_rollout_eval
    from rlpipe.types import SamplingParams

    model = str(config.model_path())
    tokenizer = AutoTokenizer.from_pretrained(model)
    builders = [TicTacToeGroupBuilder(tokenizer) for _ in range(n_games)]
    params = SamplingParams(max_tokens=config.explorer.max_tokens, temperature=config.explorer.temperature)
    return run_rollout_eval(model, adapter, builders, params, backend=config.learner.eval_sampler, max_turns=MAX_TURNS)


def main(argv=None, stop_engines: bool = False) -> dict:
    """stop_engines: shut the evaluation engine down at the end (as a script; a test session shares it)."""
    from rlpipe.pipeline.launch import launcher_output

    args = parse_args(argv)
    # SFT and evaluations run here, in the launcher: engine output to the run's log, results to the console.
    with launcher_output(Path(args.runs_dir) / args.name, stop_engines=stop_engines):
        return run(args)


def run(args) -> dict:
    from rlpipe.pipeline import launch
    from rlpipe.pipeline.learner import latest_checkpoint
    from rlpipe.metrics import window_mean
    from rlpipe.pipeline.warmup import sft_warm_up

    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    config = make_config(args)
    t0 = time.time()
    if args.sft_steps:
        config.learner.init_from = sft_warm_up(config, lambda tok: transcripts(tok, n_games=100, seed=args.seed),
                                               args.sft_steps, batch_size=8)
        console.say(f"SFT warm-up on scripted legal games: {args.sft_steps} steps ({time.time() - t0:.0f} s)")
    adapter = f"{config.learner.init_from}/adapter" if config.learner.init_from else None
    before = play_eval(config, adapter, args.eval_games) if args.eval_games else {}
    records = launch.run_to_end(config, "multi_agent_rl_config.json", replace=True)
    out = {"steps": len(records), "run_dir": str(config.run_dir)}
    if args.eval_games:
        after = play_eval(config, latest_checkpoint(config.run_dir)["path"] + "/adapter", args.eval_games)
        for metrics in (before, after):
            # an unreadable move ends its game, so this is unreadable moves / all moves
            metrics["eval/unreadable_per_move"] = 2 * metrics["eval/unreadable"] / metrics["eval/moves"]
        for key in ("eval/illegal", "eval/unreadable", "eval/unreadable_per_move", "eval/moves", "eval/draw"):
            name = key.split("/")[1]
            out[f"eval_{name}_before"], out[f"eval_{name}_after"] = before[key], after[key]
            console.say(f"{key:>24}: {before[key]:.3f} -> {after[key]:.3f}  ({args.eval_games} self-play games, "
                  "before vs after RL)")
    out["seconds"] = time.time() - t0
    for key in ("env/illegal", "env/moves", "buffer/dropped_no_signal"):
        name = key.split("/")[1]
        value = lambda r, k=key: r.get(k, 0.0)  # noqa: E731  (buffer/dropped_no_signal is absent until a drop)
        out[f"{name}_first"], out[f"{name}_last"] = window_mean(records, value, True), window_mean(records, value, False)
        console.say(f"{key:>24}: {out[f'{name}_first']:.3f} -> {out[f'{name}_last']:.3f}  (first vs last quarter of the steps)")
    (Path(out["run_dir"]) / "summary.json").write_text(json.dumps(out, indent=1))
    console.say(f"total {out['seconds']:.0f} s; everything the run wrote (summary.json: these figures) is in {config.run_dir}")
    return out


if __name__ == "__main__":
    main(stop_engines=True)
