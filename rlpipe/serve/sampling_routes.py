"""`rlpipe serve` endpoints of sampling: sampling sessions and `asample` (sample and
compute_logprobs), run concurrently on rlpipe's sampler (samplers.py)."""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI, Request

from rlpipe.serve import bodies, wire
from rlpipe.serve.futures import UserError
from rlpipe.serve.http import API, known_session, read


def add_sampler(s, sampler_id: str, model_path: str | None, base_model: str | None) -> None:
    """Register sampler_id for model_path (a tinker:// sampler checkpoint) or base_model."""
    if model_path is not None:
        source = s.registry.checkpoint(model_path)
        if source["kind"] != "sampler":
            raise UserError(f"{model_path} is not a sampler checkpoint (tinker://.../sampler_weights/...)")
        base_model = s.registry.model(source["model_id"])["base_model"]
        s.registry.add_sampler(sampler_id, base_model, model_path, Path(source["path"]))
    elif base_model is not None:
        s.trainers.base_dir(base_model)
        s.registry.add_sampler(sampler_id, base_model, None, None)
    else:
        raise UserError("a sampler needs a model_path (tinker://.../sampler_weights/...) or a base_model")


def register(app: FastAPI, s) -> None:

    @app.post(API + "/create_sampling_session")
    async def create_sampling_session(request: Request):
        body = await read(request, bodies.CreateSamplingSession)
        known_session(s.registry, body.session_id)
        sampler_id = f"{body.session_id}:sample:{body.sampling_session_seq_id}"
        add_sampler(s, sampler_id, body.model_path, body.base_model)
        return {"sampling_session_id": sampler_id, "type": "create_sampling_session"}

    @app.get(API + "/samplers/{sampler_id}")
    async def get_sampler(sampler_id: str):
        row = s.samplers.info(sampler_id)
        return {"sampler_id": sampler_id, "base_model": row["base_model"], "model_path": row["model_path"]}

    @app.post(API + "/asample")
    async def asample(request: Request):
        body = await read(request, bodies.Sample)
        sampler_id = body.sampling_session_id
        adhoc = sampler_id is None
        if adhoc:  # a one-off sampler from base_model / model_path
            sampler_id = f"adhoc:{body.model_path or body.base_model}"
            if s.registry.sampler(sampler_id) is None:
                add_sampler(s, sampler_id, body.model_path, body.base_model)
        s.samplers.info(sampler_id)
        if unsupported := body.unsupported():
            raise UserError(f"{', '.join(unsupported)}: not supported by rlpipe serve")
        params, prompt_logprobs = body.sampling_params.params(), bool(body.prompt_logprobs)
        # One-off samplers are shared by every client, so their seq_ids are not a retry's identity.
        key = None if adhoc or body.seq_id is None else ("sample", sampler_id, body.seq_id)
        entry, fresh = s.futures.new("sample", key=key)
        if fresh:
            request_id = entry.request_id

            async def job():
                response, model_id, version = await s.samplers.sample(sampler_id, body.prompt, body.num_samples, params,
                                                                      prompt_logprobs)
                if body.record_stability_info:
                    session_id = sampler_id.rpartition(":sample:")[0] or None
                    for i, seq in enumerate(response.sequences):
                        s.stability.record(f"{request_id}:{i}", session_id, model_id, version, seq.tokens, seq.logprobs)
                return wire.encode_sample(response, prompt_logprobs_last_n=body.prompt_logprobs_last_n)

            s.spawn(entry, job)
        ids = [f"{entry.request_id}:{i}" for i in range(body.num_samples)]
        return {"request_id": entry.request_id, "sample_sequence_ids": ids}
