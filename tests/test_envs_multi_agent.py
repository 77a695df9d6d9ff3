"""Tic-tac-toe self-play (zero-sum group rewards, illegal moves, turn-taking, token
accounting) and the guess-the-number dialogue with its scripted answerer."""

import asyncio
import re

import pytest
from transformers import AutoTokenizer

from envs.multi_agent import (GuessNumberDataset, GuessNumberEnv, TicTacToeDataset, TicTacToeGame,
                              TicTacToeGroupBuilder, answerer, parse_move)
from tests.scripted import Recorder, fake_logprobs
from rlpipe.evaluators import rollout_eval
from rlpipe.rollouts import do_episode, do_group
from rlpipe.types import SampledSequence, SampleResponse, SamplingParams

PARAMS = SamplingParams(max_tokens=16)


@pytest.fixture(scope="module")
def tokenizer(tiny_model_path):
    return AutoTokenizer.from_pretrained(tiny_model_path)


class ScriptedSampler:
    """Stands in for the policy: `reply(prompt_text)` picks a fixed completion, returned with
    made-up logprobs. The sampler is not under test here (the envs and the token accounting
    are), so a fake one is fine."""

    def __init__(self, tokenizer, reply, version: int = 1):
        self.tokenizer, self.reply, self.version = tokenizer, reply, version

    async def sample_async(self, prompt, num_samples, sampling_params):
        return SampleResponse(sequences=[self._one(prompt) for _ in range(num_samples)])

    def _one(self, prompt):
        text = self.reply(self.tokenizer.decode(prompt.to_ints()))
        tokens = self.tokenizer(text, add_special_tokens=False)["input_ids"] + [self.tokenizer.eos_token_id]
        return SampledSequence(stop_reason="stop", tokens=tokens, logprobs=fake_logprobs(len(tokens)),
                               policy_version=self.version)


class RecordingBuilder:
    """The tic-tac-toe builder with its envs wrapped in Recorders."""

    def __init__(self, builder):
        self.builder, self.recorders = builder, []

    async def make_envs(self):
        self.recorders = [Recorder(env) for env in await self.builder.make_envs()]
        return self.recorders

    async def compute_group_rewards(self, trajectories):
        return await self.builder.compute_group_rewards(trajectories)


def players(scripts: dict[str, list[str]]):
    """A reply function that plays each side's scripted moves in order."""
    scripts = {mark: list(moves) for mark, moves in scripts.items()}
    return lambda prompt: scripts[re.search(r"You play ([XO])\.", prompt).group(1)].pop(0)


async def play(tokenizer, x_moves, o_moves, version=6):
    builder = RecordingBuilder(TicTacToeGroupBuilder(tokenizer, move_timeout_s=30))
    sampler = ScriptedSampler(tokenizer, players({"X": x_moves, "O": o_moves}), version)
    group = await asyncio.wait_for(do_group(builder, lambda: sampler, PARAMS), 60)
    assert not group.failed, group.error
    for recorder, trajectory in zip(builder.recorders, group.trajectories):
        recorder.check_history(trajectory, version)
    return group, builder


# --------------------------------------------------------------------------- tic-tac-toe


def test_parse_move():
    assert parse_move("5") == 4 and parse_move("I take cell 9.") == 8 and parse_move(" 1\n") == 0
    assert parse_move("10") is None and parse_move("0") is None and parse_move("banana") is None and parse_move("") is None


async def test_game_rules():
    game = TicTacToeGame()
    for mark, cell in [("X", 0), ("O", 3), ("X", 1), ("O", 4), ("X", 2)]:
        await game.play(mark, cell)
    assert game.over and game.winner == "X" and game.end_reason == "win"
    assert (game.result("X"), game.result("O")) == (1.0, -1.0)
    assert game.render().splitlines()[0] == "X | X | X" and game.render().splitlines()[2] == "O | O | 6"
    with pytest.raises(RuntimeError, match="out of turn"):
        await game.play("O", 8)
    occupied = TicTacToeGame()
    await occupied.play("X", 4)
    await occupied.play("O", 4)
    assert occupied.winner == "X" and occupied.end_reason == "illegal"


async def test_self_play_win_is_zero_sum(tokenizer):
    group, builder = await play(tokenizer, ["1", "2", "3"], ["4", "5"])
    x, o = group.trajectories
    assert (x.reward, o.reward) == (1.0, -1.0) and (x.advantage, o.advantage) == (1.0, -1.0)
    assert x.metrics["win"] == 1 and o.metrics["loss"] == 1 and x.metrics["moves"] == 5
    assert sum(x.action_mask) > 0 and len(builder.recorders[0].actions) == 3 and len(builder.recorders[1].actions) == 2
    # each side sees the opponent's moves as observation tokens (mask 0)
    o_prompt = tokenizer.decode(builder.recorders[1].prompt)
    assert "You play O." in o_prompt and "X played 1." in o_prompt and o_prompt.endswith("Your move.<|end|><|assistant|>")
    x_obs = tokenizer.decode(builder.recorders[0].observations[0])
    assert x_obs == "<|user|>O played 4.\nX | 2 | 3\n---------\nO | 5 | 6\n---------\n7 | 8 | 9\nYour move.<|end|><|assistant|>"


async def test_draw(tokenizer):
    group, _ = await play(tokenizer, ["1", "3", "8", "6", "7"], ["2", "5", "4", "9"])
    assert [t.reward for t in group.trajectories] == [0.0, 0.0]
    assert all(t.metrics["draw"] == 1 and t.metrics["moves"] == 9 for t in group.trajectories)


@pytest.mark.parametrize("o_move", ["5", "banana", "0", ""])
async def test_illegal_or_unreadable_move_loses(tokenizer, o_move):
    group, _ = await play(tokenizer, ["5"], [o_move])
    x, o = group.trajectories
    assert (x.reward, o.reward) == (1.0, -1.0)
    assert o.metrics["illegal"] == 1 and x.metrics["illegal"] == 0
    assert o.metrics["unreadable"] == float(o_move != "5") and x.metrics["unreadable"] == 0


async def test_illegal_first_move(tokenizer):
    group, builder = await play(tokenizer, ["I pass"], ["5"])
    assert [t.reward for t in group.trajectories] == [-1.0, 1.0]
    # O still gets one (wasted) turn: do_episode always samples once
    assert "X made an illegal move." in tokenizer.decode(builder.recorders[1].prompt)
    assert len(builder.recorders[1].actions) == 1


async def test_silent_opponent_abandons_the_game(tokenizer):
    builder = TicTacToeGroupBuilder(tokenizer, move_timeout_s=0.2)
    x_env, o_env = await builder.make_envs()
    await x_env.initial_observation()
    o_prompt, _ = await asyncio.wait_for(o_env.initial_observation(), 5)  # X never moves
    assert "Game over: abandoned." in tokenizer.decode(o_prompt.to_ints())
    result = await o_env.step(tokenizer("5")["input_ids"])
    assert result.episode_done and result.metrics["abandoned"] == 1
    assert await builder.compute_group_rewards([None, None]) == [0.0, 0.0]


def test_tic_tac_toe_dataset(tokenizer):
    ds = TicTacToeDataset(tokenizer, groups_per_batch=3, n_batches=5)
    batch = ds.get_batch(0)
    assert len(ds) == 5 and len(batch) == 3 and len({id(b) for b in batch}) == 3


# --------------------------------------------------------------------------- guess the number


def test_answerer():
    assert [answerer(37, g) for g in (50, 20, 37)] == ["lower", "higher", "correct"]


async def guess(tokenizer, secret, guesses, max_turns=8):
    recorder = Recorder(GuessNumberEnv(secret, tokenizer, max_turns=max_turns))
    sampler = ScriptedSampler(tokenizer, lambda prompt, queue=list(guesses): queue.pop(0), version=9)
    trajectory = await do_episode(recorder, lambda: sampler, PARAMS)
    recorder.check_history(trajectory, 9)
    return trajectory, recorder


async def test_guess_the_number_dialogue(tokenizer):
    trajectory, recorder = await guess(tokenizer, 37, ["50", "25", "37"])
    assert trajectory.reward == pytest.approx(0.8) and trajectory.metrics["found"] == 1 and trajectory.metrics["guesses"] == 3
    replies = [tokenizer.decode(o) for o in recorder.observations]
    assert replies == ["<|user|>lower<|end|><|assistant|>", "<|user|>higher<|end|><|assistant|>"]
    assert "from 1 to 100" in tokenizer.decode(recorder.prompt)


async def test_guess_the_number_rewards_fewer_turns(tokenizer):
    first, _ = await guess(tokenizer, 37, ["37"])
    third, _ = await guess(tokenizer, 37, ["50", "25", "37"])
    invalid, rec = await guess(tokenizer, 37, ["banana", "1 or 2", "500", "37"])
    never, _ = await guess(tokenizer, 37, ["1", "2", "3"], max_turns=3)
    assert first.reward == 1.0 > third.reward > invalid.reward > never.reward == 0.0
    assert invalid.metrics["invalid"] == 3 and never.metrics["found"] == 0
    assert "Please reply with a single integer from 1 to 100." in tokenizer.decode(rec.observations[0])


async def test_guess_the_number_group(tokenizer):
    ds = GuessNumberDataset(tokenizer, groups_per_batch=2, group_size=3, low=1, high=10, seed=1)
    builder = ds.get_batch(0)[0]
    secret = builder.secret

    def bisect(prompt):  # a sensible player: bisects using the answers so far
        lo, hi = 1, 10
        for g, answer in re.findall(r"<\|assistant\|>(\d+)<\|end\|><\|user\|>(higher|lower)", prompt):
            lo, hi = (int(g) + 1, hi) if answer == "higher" else (lo, int(g) - 1)
        return str((lo + hi) // 2)

    group = await do_group(builder, lambda: ScriptedSampler(tokenizer, bisect), PARAMS)
    assert not group.failed, group.error
    assert all(t.metrics["found"] == 1 for t in group.trajectories) and 1 <= secret <= 10
    assert len({t.reward for t in group.trajectories}) == 1  # same play, same reward
    with pytest.raises(ValueError, match="outside"):
        GuessNumberEnv(0, tokenizer)


class BrokenBuilder:
    async def make_envs(self):
        raise RuntimeError("no board today")


async def test_rollout_eval_means_over_games(tokenizer):
    # Every player answers "5": X takes the centre, O's reply is illegal (X wins in 2 moves).
    sampler = ScriptedSampler(tokenizer, lambda prompt: "5")
    builders = [TicTacToeGroupBuilder(tokenizer, move_timeout_s=30) for _ in range(3)] + [BrokenBuilder()]
    metrics = await rollout_eval(sampler, builders, PARAMS, max_turns=5, prefix="ttt/")
    assert metrics["ttt/episodes"] == 6 and metrics["ttt/failed_groups"] == 1  # the broken game is counted
    assert metrics["ttt/reward"] == 0.0 and metrics["ttt/win"] == 0.5 and metrics["ttt/illegal"] == 0.5
    assert metrics["ttt/unreadable"] == 0.0 and metrics["ttt/moves"] == 2.0
    # a readable but different reply: "banana" is unreadable, so X loses at once
    metrics = await rollout_eval(ScriptedSampler(tokenizer, lambda prompt: "banana"),
                                 [TicTacToeGroupBuilder(tokenizer, move_timeout_s=30)], PARAMS, max_turns=5)
    assert metrics["eval/unreadable"] == 0.5 and metrics["eval/moves"] == 1.0
    with pytest.raises(RuntimeError, match="no board today"):
        await rollout_eval(sampler, [BrokenBuilder()], PARAMS)
    with pytest.raises(ValueError, match="at least one"):
        await rollout_eval(sampler, [], PARAMS)
