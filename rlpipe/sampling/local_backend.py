"""The local backend: a plain torch decoding loop over a transformers model (+ peft adapters).

For machines without vLLM and for fast unit tests; same interface and semantics as the
vLLM backend: processed logprobs (temperature, then top_k, then top_p, as vLLM applies
them), EOS / stop token ids / stop strings, max_tokens -> "length", sample i of a seeded
request uses seed + i. Token streams differ from vLLM's for the same seed (different RNG),
logprobs of the same tokens agree.

One worker thread owns the model: it batches waiting requests of the same adapter version
into one left-padded batch (KV cache via past_key_values) and also runs adapter loads and
evictions, so the model is never touched by two threads.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import itertools
import logging
import os
import queue
import shutil
import tempfile
import threading
import time
from pathlib import Path

import torch

from rlpipe.sampling.adapters import Adapter, AdapterTable, base_weight_shapes, snapshot_adapter
from rlpipe.sampling.client import Request
from rlpipe.sampling.inflight import check_mode
from rlpipe.sampling.errors import EngineDeadError, SamplingError, SamplingTimeout
from rlpipe.types import SampledSequence, SampleResponse

log = logging.getLogger(__name__)

INFLIGHT_REFUSED = (
    'weight_updates = "inflight" needs the vLLM sampler: the local sampler finishes every request on '
    'the version it started with (it is the small-machine fallback; a per-token swap would need its '
    'batches split by version and their KV recomputed). Use explorer.sampler = "vllm", or '
    'explorer.weight_updates = "between_requests".')


class LocalEngine:
    def __init__(
        self,
        base_model: str,
        *,
        max_loaded_adapters: int = 4,
        max_batch_rows: int = 64,
        max_model_len: int | None = None,
        dtype: str | None = None,
        device: str | None = None,
        weight_updates: str = "between_requests",
    ):
        """max_batch_rows: sequences decoded together (a request of n samples is n rows).
        weight_updates: only "between_requests" (every request finishes on the version it
        started with); "inflight" is refused: see INFLIGHT_REFUSED."""
        if check_mode(weight_updates) == "inflight":
            raise ValueError(INFLIGHT_REFUSED)
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

        from rlpipe.training.attention import load_options

        if not (Path(base_model) / "config.json").is_file():
            raise FileNotFoundError(f"base_model {base_model!r} is not a local Hugging Face model directory (no config.json)")
        self.base_model = str(base_model)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.dtype = getattr(torch, dtype or "float32")
        self.tokenizer = AutoTokenizer.from_pretrained(self.base_model)
        config = AutoConfig.from_pretrained(self.base_model)
        self.model = AutoModelForCausalLM.from_pretrained(self.base_model, dtype=self.dtype, **load_options(config))
        self.model = self.model.to(self.device).eval()
        config = self.model.config
        self.vocab_size = self.model.get_output_embeddings().weight.shape[0]
        self.max_model_len = max_model_len or config.max_position_embeddings
        eos = self.model.generation_config.eos_token_id
        eos = eos if isinstance(eos, list) else [eos]
        self.eos_ids = {int(t) for t in [*eos, self.tokenizer.eos_token_id] if t is not None}
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        self.max_batch_rows = max_batch_rows
        self.table = AdapterTable(max_loaded_adapters)
        self.base_shapes = base_weight_shapes(self.base_model)
        self.options = dict(max_loaded_adapters=max_loaded_adapters, max_batch_rows=max_batch_rows,
                            max_model_len=max_model_len, dtype=dtype, device=device)
        self.peft = None  # the PeftModel wrapping self.model, once an adapter is loaded
        self._ids = itertools.count(1)
        self._adapter_dir = Path(tempfile.mkdtemp(prefix="rlpipe-local-adapters-"))
        self._rng = torch.Generator().manual_seed(int.from_bytes(os.urandom(4), "little"))
        self._queue: queue.Queue = queue.Queue()
        self._closed = False
        self._worker = threading.Thread(target=self._serve, name="rlpipe-local-sampler", daemon=True)
        self._worker.start()

    @property
    def alive(self) -> bool:
        return not self._closed and self._worker.is_alive()

    def check_alive(self) -> None:
        if not self.alive:
            raise EngineDeadError(f"the local sampling engine for {self.base_model} is shut down or its worker died")

    # ------------------------------------------------------------------ adapters

    def load_adapter(self, path: str, version: int, timeout_s: float = 300.0) -> Adapter:
        self.check_alive()
        adapter = snapshot_adapter(path, self._adapter_dir, next(self._ids), version, None, self.base_shapes)
        existing = self.table.find(version, adapter.digest)
        if existing is not None:
            shutil.rmtree(adapter.path, ignore_errors=True)
            return existing
        try:
            self._call(self._load, adapter).result(timeout_s)
        except concurrent.futures.TimeoutError:
            shutil.rmtree(adapter.path, ignore_errors=True)
            raise SamplingTimeout(f"loading adapter {path!r} did not finish within {timeout_s:g} s") from None
        except Exception as e:
            shutil.rmtree(adapter.path, ignore_errors=True)
            raise ValueError(f"peft could not load adapter {path!r}: {type(e).__name__}: {e}") from e
        for old in self.table.add(adapter):
            self._call(self._delete, old)
        return adapter

    def _load(self, adapter: Adapter) -> None:
        from peft import PeftModel

        if self.peft is None:
            self.peft = PeftModel.from_pretrained(self.model, adapter.path, adapter_name=adapter.name)
        else:
            self.peft.load_adapter(adapter.path, adapter_name=adapter.name)
        self.peft.eval()

    def _delete(self, adapter: Adapter) -> None:
        self.peft.delete_adapter(adapter.name)
        shutil.rmtree(adapter.path, ignore_errors=True)

    def _weights(self, adapter: Adapter | None):
        """The model to run for adapter (None: the base weights)."""
        if self.peft is None:
            return self.model, contextlib.nullcontext()
        if adapter is None:
            return self.peft, self.peft.disable_adapter()
        self.peft.set_adapter(adapter.name)
        return self.peft, contextlib.nullcontext()

    # ------------------------------------------------------------------ requests

    def submit(self, request: Request) -> concurrent.futures.Future:
        if request.adapter is not None:
            self.table.acquire(request.adapter)
        future = concurrent.futures.Future()
        request.deadline = time.monotonic() + request.timeout_s
        self._queue.put(("request", request, future))
        return future

    def _call(self, fn, *args) -> concurrent.futures.Future:
        future = concurrent.futures.Future()
        self._queue.put(("call", (fn, args), future))
        return future

    def _serve(self) -> None:
        pending: collections.deque = collections.deque()
        while True:
            items = [] if pending else [self._queue.get()]
            with contextlib.suppress(queue.Empty):
                while True:
                    items.append(self._queue.get_nowait())
            for kind, payload, future in items:
                if kind == "stop":
                    dead = EngineDeadError(f"the local sampling engine for {self.base_model} was shut down")
                    for f in [f for _, f in pending] + [f for k, _, f in items if k != "stop"]:
                        if not f.done():
                            f.set_exception(dead)
                    return
                if kind == "call":
                    fn, args = payload
                    try:
                        future.set_result(fn(*args))
                    except Exception as e:  # handed to the caller through the future
                        future.set_exception(e)
                elif future.set_running_or_notify_cancel():
                    pending.append((payload, future))
            if not pending:
                continue
            adapter = pending[0][0].adapter
            batch, rows, rest = [], 0, collections.deque()
            for request, future in pending:
                n = 1 if request.logprobs_only else request.num_samples
                if request.adapter is adapter and (not batch or rows + n <= self.max_batch_rows):
                    batch.append((request, future))
                    rows += n
                else:
                    rest.append((request, future))
            pending = rest
            try:
                self._run_batch(batch)
            except Exception as e:  # a failed batch fails its requests, not the worker
                for _, future in batch:
                    if not future.done():
                        future.set_exception(e)
            finally:
                for request, _ in batch:
                    if request.adapter is not None:
                        for old in self.table.release(request.adapter):
                            try:
                                self._delete(old)
                            except Exception:  # the version is gone from the table either way
                                log.exception("unloading adapter version %d failed", old.version)

    @torch.inference_mode()
    def _run_batch(self, batch: list[tuple[Request, concurrent.futures.Future]]) -> None:
        # rows: (index into batch, sample index); logprobs_only requests get one row, no decoding
        rows = [(b, i) for b, (r, _) in enumerate(batch) for i in range(1 if r.logprobs_only else r.num_samples)]
        prompts = [batch[b][0].prompt for b, _ in rows]
        width = max(map(len, prompts))
        input_ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for j, p in enumerate(prompts):  # left padding: every row's next token sits in the last column
            input_ids[j, width - len(p):] = torch.tensor(p)
            mask[j, width - len(p):] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        model, ctx = self._weights(batch[0][0].adapter)
        dev = self.device
        want_prompt = any(r.prompt_logprobs for r, _ in batch)
        with ctx:
            out = model(input_ids=input_ids.to(dev), attention_mask=mask.to(dev), position_ids=positions.to(dev),
                        use_cache=True, logits_to_keep=0 if want_prompt else 1)
            cache, logits = out.past_key_values, out.logits.float()

            prompt_lps: dict[int, list[float | None]] = {}
            for j, (b, i) in enumerate(rows):
                r = batch[b][0]
                if r.prompt_logprobs and i == 0:
                    p = torch.tensor(r.prompt[1:], device=dev)
                    lp = torch.log_softmax(logits[j, width - len(r.prompt): width - 1], dim=-1)
                    prompt_lps[b] = [None] + lp.gather(-1, p[:, None])[:, 0].tolist()
            for b, (r, future) in enumerate(batch):
                if r.logprobs_only:
                    future.set_result(prompt_lps[b])

            live = [j for j, (b, _) in enumerate(rows) if not batch[b][0].logprobs_only]
            tokens: dict[int, list[int]] = {j: [] for j in live}
            logprobs: dict[int, list[float]] = {j: [] for j in live}
            reasons: dict[int, str] = {}
            gens = [self._generator(batch[b][0].decoding.seed, i) for b, i in rows]
            step_logits = logits[:, -1]
            while live:
                now = time.monotonic()
                for b, (r, future) in enumerate(batch):
                    if not future.done() and r.cancelled:  # its caller stopped waiting: stop decoding it
                        future.set_exception(SamplingError("the request was cancelled"))
                    elif not future.done() and not r.logprobs_only and now > r.deadline:
                        future.set_exception(SamplingTimeout(
                            f"sample (n={r.num_samples}, max_tokens={r.decoding.max_tokens}) on {self.base_model} "
                            f"(policy version {r.policy_version}) did not finish within {r.timeout_s:g} s; the request was aborted"))
                live = [j for j in live if not batch[rows[j][0]][1].done()]
                if not live:
                    break
                next_ids, next_lps = self._sample(step_logits, [batch[b][0].decoding for b, _ in rows], gens)
                for j in live:
                    d = batch[rows[j][0]][0].decoding
                    t = int(next_ids[j])
                    tokens[j].append(t)
                    logprobs[j].append(float(next_lps[j]))
                    if t in self.eos_ids or t in d.stop_token_ids or (d.stop_strings and self._hits_stop(tokens[j], d)):
                        reasons[j] = "stop"
                    elif len(tokens[j]) >= d.max_tokens:
                        reasons[j] = "length"
                live = [j for j in live if j not in reasons]
                if not live:
                    break
                mask = torch.cat([mask, torch.ones((len(rows), 1), dtype=torch.long)], dim=1)
                positions = positions[:, -1:] + 1
                out = model(input_ids=next_ids[:, None].to(dev), attention_mask=mask.to(dev), position_ids=positions.to(dev),
                            past_key_values=cache, use_cache=True)
                cache, step_logits = out.past_key_values, out.logits[:, -1].float()

        for b, (r, future) in enumerate(batch):
            if future.done():
                continue
            seqs = [SampledSequence(stop_reason=reasons[j], tokens=tokens[j], logprobs=logprobs[j], policy_version=r.policy_version)
                    for j, (bb, _) in enumerate(rows) if bb == b]
            future.set_result(SampleResponse(sequences=seqs, prompt_logprobs=prompt_lps.get(b)))

    def _generator(self, seed: int | None, index: int) -> torch.Generator:
        if seed is None:
            return torch.Generator().manual_seed(int(torch.randint(0, 2**62, (1,), generator=self._rng)))
        return torch.Generator().manual_seed(seed + index)

    def _hits_stop(self, tokens: list[int], d) -> bool:
        text = self.tokenizer.decode(tokens, skip_special_tokens=True)
        return any(s in text for s in d.stop_strings)

    @staticmethod
    def _sample(logits: torch.Tensor, decodings: list, gens: list[torch.Generator]) -> tuple[torch.Tensor, torch.Tensor]:
        """One token per row and its logprob under the processed distribution: logits / T,
        then top_k (keep values >= the k-th largest), then top_p (drop the smallest tokens
        whose cumulative probability stays <= 1 - p), as vLLM does. Greedy (T = 0) rows take
        the argmax and report log_softmax of the raw logits, as vLLM does."""
        logits = logits.cpu()
        vocab = logits.shape[-1]
        greedy = torch.tensor([d.temperature < 1e-5 for d in decodings])
        temps = torch.tensor([1.0 if g else d.temperature for d, g in zip(decodings, greedy)])
        ks = torch.tensor([vocab if g or d.top_k < 0 else min(d.top_k, vocab) for d, g in zip(decodings, greedy)])
        ps = torch.tensor([1.0 if g else d.top_p for d, g in zip(decodings, greedy)])
        x = logits / temps[:, None]
        x_sorted, order = x.sort(dim=-1)
        kth = x_sorted.gather(1, (vocab - ks)[:, None])
        x_sorted = x_sorted.masked_fill(x_sorted < kth, float("-inf"))
        cum = x_sorted.softmax(dim=-1).cumsum(dim=-1)
        drop = cum <= (1 - ps)[:, None]
        drop[:, -1] = False
        x_sorted = x_sorted.masked_fill(drop & (ps < 1)[:, None], float("-inf"))
        x = x.scatter(1, order, x_sorted)
        logprobs = torch.log_softmax(x, dim=-1)
        probs = logprobs.exp()
        ids = torch.empty(len(decodings), dtype=torch.long)
        for j, g in enumerate(gens):
            ids[j] = logits[j].argmax() if greedy[j] else torch.multinomial(probs[j], 1, generator=g)[0]
        return ids, logprobs.gather(1, ids[:, None])[:, 0]

    # ------------------------------------------------------------------ lifecycle

    def shutdown(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._queue.put(("stop", None, None))
        self._worker.join(timeout=60)
        shutil.rmtree(self._adapter_dir, ignore_errors=True)
