"""Multi-agent and dialogue environments.

Tic-tac-toe self-play: one group is one game. Its two envs (X and O) share a
`TicTacToeGame` and take turns through an asyncio.Condition: a player's step applies its
move, then waits until the opponent has moved (or the game is over) and returns the
opponent's move and the board as observation tokens. O's first observation waits for X's
first move. Both sides are sampled from the same policy; `compute_group_rewards` gives the
zero-sum result (+1 win, -1 loss, 0 draw; an illegal or unreadable move loses at once), and
the step rewards are 0. If a player's episode stops without moving (cut off by max_turns or
max_context, or its sampler failed), the other side gives up waiting after move_timeout_s
and the game counts as abandoned (0 for both).

Guess the number: a dialogue with a scripted answerer that says "higher", "lower" or
"correct". Reward 1 for finding the number, minus turn_penalty for every guess before the
right one (fewer turns is better); 0 if it is not found in max_turns guesses.
"""

from __future__ import annotations

import asyncio
import random
import re
from dataclasses import dataclass, field

from envs.tool_use import next_turn_tokens
from rlpipe.env import StepResult
from rlpipe.renderers import ChatTemplateRenderer
from rlpipe.types import ModelInput, Trajectory

# --------------------------------------------------------------------------- tic-tac-toe

LINES = [(0, 1, 2), (3, 4, 5), (6, 7, 8), (0, 3, 6), (1, 4, 7), (2, 5, 8), (0, 4, 8), (2, 4, 6)]
RULES = ("We play tic-tac-toe on a 3x3 board whose cells are numbered 1 to 9, left to right, top to bottom. "
         "Empty cells show their number. On your turn, reply with the number of an empty cell and nothing else. "
         "A move that is not an empty cell loses the game.")
MOVE_RE = re.compile(r"(?<!\d)([1-9])(?!\d)")


def other(mark: str) -> str:
    return "O" if mark == "X" else "X"


def parse_move(text: str) -> int | None:
    """The cell (0-8) of the first standalone digit 1-9 in the text, or None."""
    match = MOVE_RE.search(text)
    return int(match.group(1)) - 1 if match else None


class TicTacToeGame:
    """The state both players of one game share."""

    def __init__(self, move_timeout_s: float = 120.0):
        self.board: list[str] = [""] * 9
        self.to_move = "X"
        self.moves: list[tuple[str, int | None]] = []
        """(mark, cell) in order; cell None for an unreadable move."""
        self.over = False
        self.winner: str | None = None
        self.end_reason = ""
        """"win", "draw", "illegal" (the loser's move) or "abandoned"."""
        self.move_timeout_s = move_timeout_s
        self.changed = asyncio.Condition()

    def render(self) -> str:
        rows = [" | ".join(self.board[i] or str(i + 1) for i in range(r, r + 3)) for r in (0, 3, 6)]
        return "\n---------\n".join(rows)

    def _finish(self, winner: str | None, reason: str) -> None:
        self.over, self.winner, self.end_reason = True, winner, reason

    async def play(self, mark: str, cell: int | None) -> None:
        async with self.changed:
            if self.over or self.to_move != mark:
                raise RuntimeError(f"{mark} moved out of turn")  # a bug in the envs, not the model
            self.moves.append((mark, cell))
            if cell is None or self.board[cell]:
                self._finish(other(mark), "illegal")
            else:
                self.board[cell] = mark
                if any(all(self.board[i] == mark for i in line) for line in LINES):
                    self._finish(mark, "win")
                elif all(self.board):
                    self._finish(None, "draw")
                self.to_move = other(mark)
            self.changed.notify_all()

    async def wait_for_turn(self, mark: str) -> None:
        """Until it is mark's turn or the game is over; a silent opponent abandons the game."""
        async with self.changed:
            try:
                await asyncio.wait_for(self.changed.wait_for(lambda: self.over or self.to_move == mark),
                                       self.move_timeout_s)
            except asyncio.TimeoutError:
                self._finish(None, "abandoned")
                self.changed.notify_all()

    def result(self, mark: str) -> float:
        if not self.over or self.winner is None:
            return 0.0
        return 1.0 if self.winner == mark else -1.0


class TicTacToePlayerEnv:
    def __init__(self, game: TicTacToeGame, mark: str, tokenizer):
        self.game, self.mark, self.tokenizer = game, mark, tokenizer

    def report(self) -> str:
        """What happened since this player's last move, then the board."""
        last = self.game.moves[-1] if self.game.moves and self.game.moves[-1][0] != self.mark else None
        lines = []
        if last is not None:
            lines.append(f"{last[0]} played {last[1] + 1}." if last[1] is not None and self.game.end_reason != "illegal"
                         else f"{last[0]} made an illegal move.")
        lines.append(self.game.render())
        lines.append(f"Game over: {self.game.end_reason}." if self.game.over else "Your move.")
        return "\n".join(lines)

    def metrics(self) -> dict[str, float]:
        g = self.game
        return {"win": float(g.winner == self.mark), "loss": float(g.winner == other(self.mark)),
                "draw": float(g.end_reason == "draw"),
                "illegal": float(g.end_reason == "illegal" and g.winner != self.mark),  # this side's move
                "unreadable": float(g.end_reason == "illegal" and g.winner != self.mark and g.moves[-1][1] is None),
                "abandoned": float(g.end_reason == "abandoned"), "moves": float(len(g.moves))}

    async def initial_observation(self):
        if self.mark == "O":
            await self.game.wait_for_turn("O")
        intro = f"You play {self.mark}." + (" You move first." if self.mark == "X" else "")
        messages = [{"role": "system", "content": RULES}, {"role": "user", "content": f"{intro}\n{self.report()}"}]
        return ChatTemplateRenderer(self.tokenizer).build_generation_prompt(messages), [self.tokenizer.eos_token_id]

    async def step(self, action: list[int]) -> StepResult:
        if not self.game.over:  # it is over already if the opponent's first move was illegal
            cell = parse_move(self.tokenizer.decode(action, skip_special_tokens=True))
            await self.game.play(self.mark, cell)
            await self.game.wait_for_turn(self.mark)
        if self.game.over:
            return StepResult(reward=0.0, episode_done=True, metrics=self.metrics())
        observation = next_turn_tokens(self.tokenizer, [{"role": "user", "content": self.report()}], action)
        return StepResult(reward=0.0, episode_done=False, next_observation=ModelInput.from_ints(observation),
                          next_stop_condition=[self.tokenizer.eos_token_id], metrics=self.metrics())


@dataclass
class TicTacToeGroupBuilder:
    """One game: make_envs returns [X, O] sharing a fresh game. One builder per group
    (the dataset makes a new one each time), since the rewards are read from its game."""

    tokenizer: object
    move_timeout_s: float = 120.0
    game: TicTacToeGame | None = field(default=None, init=False)

    async def make_envs(self):
        self.game = TicTacToeGame(self.move_timeout_s)
        return [TicTacToePlayerEnv(self.game, mark, self.tokenizer) for mark in ("X", "O")]

    async def compute_group_rewards(self, trajectories: list[Trajectory]) -> list[float]:
        if self.game is None or len(trajectories) != 2:
            raise ValueError("compute_group_rewards needs the two trajectories of this builder's game")
        return [self.game.result("X"), self.game.result("O")]


class TicTacToeDataset:
    """groups_per_batch self-play games per batch (every game starts from the empty board;
    sampling makes them differ)."""

    def __init__(self, tokenizer, groups_per_batch: int = 8, n_batches: int = 1000, move_timeout_s: float = 120.0):
        self.tokenizer, self.groups_per_batch, self.n_batches = tokenizer, groups_per_batch, n_batches
        self.move_timeout_s = move_timeout_s

    def __len__(self) -> int:
        return self.n_batches

    def get_batch(self, index: int) -> list[TicTacToeGroupBuilder]:
        return [TicTacToeGroupBuilder(self.tokenizer, self.move_timeout_s) for _ in range(self.groups_per_batch)]


# --------------------------------------------------------------------------- guess the number

INT_RE = re.compile(r"-?\d+")


def answerer(secret: int, guess: int) -> str:
    """The scripted other side of the dialogue."""
    return "correct" if guess == secret else ("higher" if secret > guess else "lower")


class GuessNumberEnv:
    def __init__(self, secret: int, tokenizer, low: int = 1, high: int = 100, max_turns: int = 8,
                 turn_penalty: float = 0.1):
        if not low <= secret <= high:
            raise ValueError(f"secret {secret} is outside [{low}, {high}]")
        if turn_penalty * (max_turns - 1) >= 1:
            raise ValueError("turn_penalty * (max_turns - 1) must stay below 1 so that finding the number always pays")
        self.secret, self.tokenizer, self.low, self.high = secret, tokenizer, low, high
        self.max_turns, self.turn_penalty = max_turns, turn_penalty
        self.turns = self.invalid = 0

    async def initial_observation(self):
        text = (f"I am thinking of an integer from {self.low} to {self.high}. Guess it: reply with a single number. "
                f"I will say 'higher', 'lower' or 'correct'. You have {self.max_turns} guesses.")
        prompt = ChatTemplateRenderer(self.tokenizer).build_generation_prompt([{"role": "user", "content": text}])
        return prompt, [self.tokenizer.eos_token_id]

    def metrics(self, found: bool) -> dict[str, float]:
        return {"found": float(found), "guesses": float(self.turns), "invalid": float(self.invalid)}

    async def step(self, action: list[int]) -> StepResult:
        self.turns += 1
        numbers = INT_RE.findall(self.tokenizer.decode(action, skip_special_tokens=True))
        guess = int(numbers[0]) if len(numbers) == 1 else None  # exactly one number counts as a guess
        if guess == self.secret:
            return StepResult(reward=1.0 - self.turn_penalty * (self.turns - 1), episode_done=True,
                              metrics=self.metrics(True))
        if self.turns >= self.max_turns:
            return StepResult(reward=0.0, episode_done=True, metrics=self.metrics(False))
        if guess is None or not self.low <= guess <= self.high:
            self.invalid += 1
            reply = f"Please reply with a single integer from {self.low} to {self.high}."
        else:
            reply = answerer(self.secret, guess)
        observation = next_turn_tokens(self.tokenizer, [{"role": "user", "content": reply}], action)
        return StepResult(reward=0.0, episode_done=False, next_observation=ModelInput.from_ints(observation),
                          next_stop_condition=[self.tokenizer.eos_token_id], metrics=self.metrics(False))


@dataclass
class GuessNumberGroupBuilder:
    secret: int
    tokenizer: object
    group_size: int
    low: int = 1
    high: int = 100
    max_turns: int = 8

    async def make_envs(self):
        return [GuessNumberEnv(self.secret, self.tokenizer, self.low, self.high, self.max_turns)
                for _ in range(self.group_size)]


class GuessNumberDataset:
    """groups_per_batch secrets per batch, each guessed group_size times."""

    def __init__(self, tokenizer, groups_per_batch: int = 8, group_size: int = 8, low: int = 1, high: int = 100,
                 max_turns: int = 8, n_problems: int = 10_000, seed: int = 0):
        self.tokenizer, self.groups_per_batch, self.group_size = tokenizer, groups_per_batch, group_size
        self.low, self.high, self.max_turns = low, high, max_turns
        rng = random.Random(seed)
        self.secrets = [rng.randint(low, high) for _ in range(n_problems)]

    def __len__(self) -> int:
        return len(self.secrets) // self.groups_per_batch

    def get_batch(self, index: int) -> list[GuessNumberGroupBuilder]:
        start = (index % len(self)) * self.groups_per_batch
        return [GuessNumberGroupBuilder(s, self.tokenizer, self.group_size, self.low, self.high, self.max_turns)
                for s in self.secrets[start : start + self.groups_per_batch]]
