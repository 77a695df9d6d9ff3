"""`rlpipe serve` endpoints of training models: create (or create from a checkpoint), get_info,
forward/forward_backward (protobuf), optim_step and the weight saves and loads. Each runs in
its model's queue (trainers.py), in seq_id order."""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path

from fastapi import FastAPI, Request

from rlpipe.serve import bodies, stability, wire
from rlpipe.serve.futures import UserError
from rlpipe.serve.http import API, TooLarge, future_reply, known_session, read, read_body
from rlpipe.serve.registry import dir_size, tinker_path
from rlpipe.training import checkpoint
from rlpipe.types import LoraConfig, TensorData

EPHEMERAL_KEEP = 64
"""Newest ephemeral sampler adapters kept per model (save_weights_and_get_sampling_client)."""


def register(app: FastAPI, s) -> None:
    # ------------------------------------------------------------------ models

    @app.post(API + "/create_model")
    async def create_model(request: Request):
        body = await read(request, bodies.CreateModel)
        known_session(s.registry, body.session_id)
        base_dir = s.trainers.base_dir(body.base_model)  # an unknown base is refused now, not in the future
        lora = body.lora_config.config() if body.lora_config else LoraConfig()
        await asyncio.to_thread(s.samplers.check_lora, base_dir, lora)
        model_id = f"{body.session_id}:train:{body.model_seq_id}"
        entry, fresh = s.futures.new("create_model", key=("create", body.session_id, body.model_seq_id))
        if fresh:
            async def job():
                await s.trainers.create(model_id, body.session_id, body.base_model, lora, body.user_metadata or {})
                return {"model_id": model_id, "type": "create_model"}

            s.spawn(entry, job)
        return {"request_id": entry.request_id, "model_id": model_id}

    @app.post(API + "/get_info")
    async def get_info(request: Request):
        model_id = (await read(request, bodies.ModelRef)).model_id
        client = s.trainers.client(model_id)
        row = s.registry.model(model_id)
        config = json.loads((Path(client.base_model) / "config.json").read_text())
        return {"type": "get_info", "model_id": model_id, "is_lora": True, "lora_rank": client.lora.rank,
                "model_name": row["base_model"], "optimizer_config": {"type": "adamw"},
                "model_data": {"arch": config.get("model_type"), "model_name": row["base_model"],
                               "tokenizer_id": str(Path(client.base_model).absolute())}}

    @app.post(API + "/unload_model")
    async def unload_model(request: Request):
        model_id = (await read(request, bodies.ModelRef)).model_id
        s.trainers.client(model_id)
        await s.trainers.unload(model_id)
        return future_reply(s.futures.completed("unload_model", {"model_id": model_id, "type": "unload_model"}))

    # ------------------------------------------------------------------ training

    @app.post(API + "/forward_backward")
    async def forward_backward(request: Request):
        raw = await read_body(request)
        if request.headers.get("content-encoding", "").lower() == "zstd":
            raw = unzstd(raw, request.app.state.max_body_bytes)
        # Decoding a large batch takes a while: off the event loop, which serves every poll.
        message, data, config = await asyncio.to_thread(wire.decode_forward_backward, raw)
        client = s.trainers.client(message.model_id)
        loss_fn, forward_only = message.loss_fn, message.forward_only
        spans = wire.loss_spans(message) if loss_fn == "stable_reinforce" else None
        session_id = s.registry.model(message.model_id)["session_id"]

        async def job():
            batch, recorded, extra = data, None, {}
            if spans is not None:  # resolved when the job runs, so the version lag is the step's own
                batch, recorded, extra = stability.prepare(s.stability, data, spans, session_id, client.step)
            call = client.forward if forward_only else client.forward_backward
            out = await call(batch, loss_fn, config).result_async()
            if recorded is not None:
                out.metrics.update(extra)
                for row, lp in zip(out.loss_fn_outputs, recorded):
                    row["sampling_logprobs"] = TensorData.from_numpy(lp)
            return wire.encode_forward_backward(out)

        entry = s.trainers.submit(message.model_id, message.seq_id, "forward" if forward_only else "forward_backward", job)
        return {"request_id": entry.request_id, "model_id": message.model_id}

    @app.post(API + "/forward")
    async def forward_json(request: Request):
        raise UserError("send forward as a protobuf forward_backward with forward_only=true (what the SDK does)")

    @app.post(API + "/optim_step")
    async def optim_step(request: Request):
        body = await read(request, bodies.OptimStep)
        client = s.trainers.client(body.model_id)
        params = body.adam_params.params()

        async def job():
            out = await client.optim_step(params).result_async()
            return {"metrics": out.metrics}

        return future_reply(s.trainers.submit(body.model_id, body.seq_id, "optim_step", job))

    @app.post(API + "/save_weights")
    async def save_weights(request: Request):
        body = await read(request, bodies.SaveWeights)
        model_id = body.model_id
        client = s.trainers.client(model_id)
        name = checkpoint.check_name(body.path)

        async def job():
            if not body.overwrite and (client.checkpoint_dir / "state" / name).exists():
                raise UserError(f"checkpoint {tinker_path(model_id, 'training', name)} exists (overwrite=false)")
            out = await client.save_state(name).result_async()
            return {"path": s.registry.add_checkpoint(model_id, "training", name, Path(out.path), body.ttl_seconds),
                    "type": "save_weights"}

        return future_reply(s.trainers.submit(model_id, body.seq_id, "save_weights", job))

    @app.post(API + "/load_weights")
    async def load_weights(request: Request):
        body = await read(request, bodies.LoadWeights)
        path = body.path
        source = s.registry.checkpoint(path)
        if source["kind"] != "training":
            raise UserError(f"{path} is not a training checkpoint (tinker://.../weights/...)")
        if body.model_id is not None:
            model_id = body.model_id
            client = s.trainers.client(model_id)
            trained_on = s.registry.model(source["model_id"])["base_model"]
            if s.trainers.base_dir(trained_on) != client.base_model:
                raise UserError(f"{path} was trained on {trained_on}, model {model_id} on {s.registry.model(model_id)['base_model']}")
            if body.seq_id is None:
                raise UserError("load_weights into model_id needs its seq_id")

            async def job():
                await load(client, source["path"], body.optimizer)
                return {"path": path, "model_id": model_id, "type": "load_weights"}

            return future_reply(s.trainers.submit(model_id, body.seq_id, "load_weights", job))
        # create_training_client_from_state: the client names the new model itself.
        if body.session_id is None or body.model_seq_id is None:
            raise UserError("load_weights needs model_id and seq_id, or session_id and model_seq_id (a new model)")
        known_session(s.registry, body.session_id)
        model_id = f"{body.session_id}:train:{body.model_seq_id}"
        origin = s.registry.model(source["model_id"])
        entry, fresh = s.futures.new("load_weights", key=("create", body.session_id, body.model_seq_id))
        if fresh:
            meta = checkpoint.read_meta(source["path"])
            metadata = body.user_metadata or origin["user_metadata"]

            async def job():
                await asyncio.to_thread(s.samplers.check_lora, s.trainers.base_dir(origin["base_model"]), meta.lora)
                client = await s.trainers.create(model_id, body.session_id, origin["base_model"], meta.lora, metadata)
                await load(client, source["path"], body.optimizer)
                return {"path": path, "model_id": model_id, "type": "load_weights"}

            s.spawn(entry, job)
        return {"request_id": entry.request_id, "model_id": model_id}

    @app.post(API + "/save_weights_for_sampler")
    async def save_weights_for_sampler(request: Request):
        body = await read(request, bodies.SaveWeightsForSampler)
        model_id = body.model_id
        client = s.trainers.client(model_id)
        row = s.registry.model(model_id)
        if body.path is not None:
            if body.kind == "inflight":
                raise UserError("kind=\"inflight\" publishes the model's shared sampler weights: it takes a "
                                "sampling_session_seq_id (save_weights_and_get_sampling_client), not a path")
            name = checkpoint.check_name(body.path)

            async def job():
                out = await client.save_weights_for_sampler(name).result_async()
                return {"path": s.registry.add_checkpoint(model_id, "sampler", name, Path(out.path), body.ttl_seconds),
                        "type": "save_weights_for_sampler"}
        elif body.sampling_session_seq_id is not None:
            seq = body.sampling_session_seq_id
            sampler_id = f"{row['session_id']}:sample:{seq}"

            async def job():
                out = await client.save_weights_for_sampler(f"ephemeral-{seq:06d}").result_async()
                s.registry.add_sampler(sampler_id, row["base_model"], None, Path(out.path))
                # Before the future completes: a sample sent after it sees the new target.
                s.samplers.published(sampler_id, model_id, out.path, client.step, body.kind)
                keep = s.samplers.inflight.get(model_id, (None,))[0]
                await asyncio.to_thread(_prune_ephemeral, client.checkpoint_dir / "sampler_weights", keep)
                return {"sampling_session_id": sampler_id, "type": "save_weights_for_sampler"}
        else:
            raise UserError("save_weights_for_sampler needs a path or a sampling_session_seq_id")

        return future_reply(s.trainers.submit(model_id, body.seq_id, "save_weights_for_sampler", job))

    @app.post(API + "/save_weights_external")
    async def save_weights_external(request: Request):
        body = await read(request, bodies.SaveWeightsExternal)
        model_id = body.model_id
        client = s.trainers.client(model_id)
        name = checkpoint.check_name(body.path)

        async def job():
            files = await client.get_sampler_weights().result_async()
            path = s.registry.model_dir(model_id) / "external_weights" / name
            await asyncio.to_thread(_write_export, path, files, body.age_encryption_recipients)
            return {"path": s.registry.add_checkpoint(model_id, "external", name, path, body.ttl_seconds),
                    "size_bytes": dir_size(path), "type": "save_weights_external"}

        return future_reply(s.trainers.submit(model_id, body.seq_id, "save_weights_external", job))


async def load(client, path: str, with_optimizer: bool) -> None:
    call = client.load_state_with_optimizer if with_optimizer else client.load_state
    await call(path).result_async()


def unzstd(raw: bytes, limit: int) -> bytes:
    """A zstd body, decompressed as a stream up to limit bytes (a frame's declared size is not trusted)."""
    import io

    import zstandard

    try:
        out = zstandard.ZstdDecompressor().stream_reader(io.BytesIO(raw)).read(limit + 1)
    except zstandard.ZstdError as e:
        raise UserError(f"malformed zstd body: {e}") from None
    if len(out) > limit:
        raise TooLarge(f"request body over {limit} bytes once decompressed")
    return out


def _write_export(path: Path, files: dict[str, bytes], recipients: list | None) -> None:
    if recipients:  # the SDK's training-state download asks for age-encrypted files
        files = {f"{k}.age": v for k, v in _encrypt(files, recipients).items()}
    path.mkdir(parents=True, exist_ok=True)
    for file_name, data in files.items():
        (path / file_name).write_bytes(data)


def _encrypt(files: dict[str, bytes], recipients: list) -> dict[str, bytes]:
    try:
        import pyrage
    except ImportError:
        raise UserError("age-encrypted exports need the pyrage package on the server (pip install pyrage)") from None
    try:
        keys = [pyrage.x25519.Recipient.from_str(r) for r in recipients]
    except (pyrage.RecipientError, TypeError, ValueError) as e:
        raise UserError(f"bad age_encryption_recipients: {e}") from None
    return {name: pyrage.encrypt(data, keys) for name, data in files.items()}


def _prune_ephemeral(folder: Path, keep: str | None = None) -> None:
    """keep: the in-flight target, which stays however old (it is the newest in-flight save,
    but snapshot saves after it may outnumber EPHEMERAL_KEEP)."""
    old = sorted(p for p in folder.glob("ephemeral-*") if p.is_dir())[:-EPHEMERAL_KEEP]
    for path in old:
        if keep is None or Path(keep).resolve() != path.resolve():
            shutil.rmtree(path, ignore_errors=True)
