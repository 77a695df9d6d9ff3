"""Envs that misbehave on purpose, for the pipeline's fault tests (loaded by the explorer
process through the run config, so they live in an importable module)."""

from __future__ import annotations

import asyncio

from envs.toy import DigitsDataset, DigitsEnv


class FlakyEnv:
    def __init__(self, env: DigitsEnv, mode: str):
        self.env, self.mode = env, mode

    async def initial_observation(self):
        return await self.env.initial_observation()

    async def step(self, action):
        if self.mode == "raise":
            raise RuntimeError("this env crashed on purpose")
        if self.mode == "hang":
            await asyncio.sleep(3600)
        return await self.env.step(action)


class FlakyBuilder:
    def __init__(self, builder, mode: str):
        self.builder, self.mode = builder, mode

    async def make_envs(self):
        envs = await self.builder.make_envs()
        return [FlakyEnv(env, self.mode if i == 0 else "ok") for i, env in enumerate(envs)]


class FlakyDataset:
    """DigitsDataset where every 5th group has an env that raises and every 7th one that hangs."""

    def __init__(self, tokenizer, groups_per_batch: int = 4, group_size: int = 8):
        self.inner = DigitsDataset(tokenizer, groups_per_batch, group_size)
        self.groups_per_batch = groups_per_batch

    def __len__(self) -> int:
        return len(self.inner)

    def get_batch(self, index):
        out = []
        for i, builder in enumerate(self.inner.get_batch(index)):
            n = index * self.groups_per_batch + i
            out.append(FlakyBuilder(builder, "raise" if n % 5 == 2 else "hang" if n % 7 == 3 else "ok"))
        return out
