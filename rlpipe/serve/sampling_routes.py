"""`rlpipe serve` endpoints of sampling: sampling sessions and `asample` (sample and
compute_logprobs), run concurrently on rlpipe's sampler (samplers.py)."""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI, Request

from rlpipe.serve import wire
from rlpipe.serve.futures import UserError
from rlpipe.serve.http import API, field, known_session, read_json


def add_sampler(s, sampler_id: str, body: dict) -> None:
    """Register sampler_id for body's model_path (a tinker:// sampler checkpoint) or base_model."""
    model_path = field(body, "model_path", str, required=False)
    if model_path is not None:
        source = s.registry.checkpoint(model_path)
        if source["kind"] != "sampler":
            raise UserError(f"{model_path} is not a sampler checkpoint (tinker://.../sampler_weights/...)")
        base_model = s.registry.model(source["model_id"])["base_model"]
        s.registry.add_sampler(sampler_id, base_model, model_path, Path(source["path"]))
    else:
        base_model = field(body, "base_model", str)
        s.trainers.base_dir(base_model)
        s.registry.add_sampler(sampler_id, base_model, None, None)


def register(app: FastAPI, s) -> None:

    @app.post(API + "/create_sampling_session")
    async def create_sampling_session(request: Request):
        body = await read_json(request)
        session_id = known_session(s.registry, body)
        seq = field(body, "sampling_session_seq_id", int)
        sampler_id = f"{session_id}:sample:{seq}"
        add_sampler(s, sampler_id, body)
        return {"sampling_session_id": sampler_id, "type": "create_sampling_session"}

    @app.get(API + "/samplers/{sampler_id}")
    async def get_sampler(sampler_id: str):
        row = s.samplers.info(sampler_id)
        return {"sampler_id": sampler_id, "base_model": row["base_model"], "model_path": row["model_path"]}

    @app.post(API + "/asample")
    async def asample(request: Request):
        body = await read_json(request)
        sampler_id = body.get("sampling_session_id")
        adhoc = sampler_id is None
        if adhoc:  # a one-off sampler from base_model / model_path
            sampler_id = f"adhoc:{body.get('model_path') or body.get('base_model')}"
            if s.registry.sampler(sampler_id) is None:
                add_sampler(s, sampler_id, body)
        if not isinstance(sampler_id, str):
            raise UserError("sampling_session_id must be a string")
        s.samplers.info(sampler_id)
        num_samples = field(body, "num_samples", int, required=False, default=1)
        if not 1 <= num_samples <= 4096:
            raise UserError(f"num_samples must be in [1, 4096], got {num_samples}")
        prompt = wire.prompt_from_json(body.get("prompt"))
        params = wire.sampling_params_from_json(body.get("sampling_params") or {})
        prompt_logprobs = bool(body.get("prompt_logprobs"))
        last_n = field(body, "prompt_logprobs_last_n", int, required=False)
        for unsupported in ("topk_prompt_logprobs", "topk_sample_logprobs", "prompt_alt_tokens_k", "target_prompt_logprobs"):
            if body.get(unsupported):
                raise UserError(f"{unsupported} is not supported by rlpipe serve")
        seq = body.get("seq_id")
        # One-off samplers are shared by every client, so their seq_ids are not a retry's identity.
        key = None if adhoc or seq is None else ("sample", sampler_id, seq)
        entry, fresh = s.futures.new("sample", key=key)
        if fresh:
            async def job():
                response = await s.samplers.sample(sampler_id, prompt, num_samples, params, prompt_logprobs)
                return wire.encode_sample(response, prompt_logprobs_last_n=last_n)

            s.spawn(entry, job)
        ids = [f"{entry.request_id}:{i}" for i in range(num_samples)]
        return {"request_id": entry.request_id, "sample_sequence_ids": ids}
