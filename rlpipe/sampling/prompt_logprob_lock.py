"""Shared and exclusive admission of requests on one event loop.

Why: vLLM 0.32 (CPU) kills its engine when a request asking for prompt logprobs shares an
engine step with any other request on a model whose lm_head is wrapped for LoRA (Llama,
Qwen3, rlpipe's tiny model): `_get_prompt_logprobs_dict` computes one request's logits
while the punica LoRA indices hold one entry per request, and `bgmv_shrink`'s einsum fails
("subscript b has size 2 ... does not broadcast"). Such requests therefore run alone: an
exclusive holder waits for the shared ones in flight to finish, and new shared ones wait
while an exclusive one waits or runs (so it is not starved).
"""

from __future__ import annotations

import asyncio
import contextlib


class PromptLogprobLock:
    def __init__(self):
        self._shared = 0
        self._exclusive = False
        self._exclusive_waiting = 0
        self._changed: asyncio.Condition | None = None  # made on the loop that first uses it

    @contextlib.asynccontextmanager
    async def hold(self, exclusive: bool):
        changed = self._changed = self._changed or asyncio.Condition()
        async with changed:
            if exclusive:
                self._exclusive_waiting += 1
                try:
                    await changed.wait_for(lambda: not self._exclusive and self._shared == 0)
                finally:
                    self._exclusive_waiting -= 1
                self._exclusive = True
            else:
                await changed.wait_for(lambda: not self._exclusive and self._exclusive_waiting == 0)
                self._shared += 1
        try:
            yield
        finally:
            async with changed:
                if exclusive:
                    self._exclusive = False
                else:
                    self._shared -= 1
                changed.notify_all()
