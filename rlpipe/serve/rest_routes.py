"""`rlpipe serve` REST reads and housekeeping: training runs, checkpoints (list, delete, ttl),
weights_info and the download URLs of exported weights."""

from __future__ import annotations

import contextlib
import time
from pathlib import Path

from fastapi import FastAPI, Request

from rlpipe.serve import bodies
from rlpipe.serve.futures import NotFound, UserError
from rlpipe.serve.http import API, iso, read
from rlpipe.serve.registry import KIND_PREFIX, PREFIX_KIND, UnknownPath, parse_tinker_path, tinker_path


def file_urls(path: Path) -> dict[str, str]:
    """{relative path: file:// URL} of every file of a checkpoint: the SDK fetches them with urlretrieve."""
    return {str(p.relative_to(path)): p.as_uri() for p in sorted(Path(path).rglob("*")) if p.is_file()}


@contextlib.contextmanager
def unknown_is_404():
    """An unknown checkpoint is what a REST read looks up: 404 (elsewhere it is bad input, 400)."""
    try:
        yield
    except UnknownPath as e:
        raise NotFound(str(e)) from None


def register(app: FastAPI, s) -> None:
    # ------------------------------------------------------------------ REST

    def checkpoint_json(row: dict) -> dict:
        return {"checkpoint_id": f"{KIND_PREFIX[row['kind']]}/{row['name']}", "checkpoint_type": row["kind"],
                "time": iso(row["created"]), "tinker_path": tinker_path(row["model_id"], row["kind"], row["name"]),
                "size_bytes": row["size_bytes"], "public": False, "expires_at": iso(row["expires"])}

    def run_json(model_id: str) -> dict:
        row = s.registry.model(model_id)
        if row is None:
            raise NotFound(f"unknown training run {model_id!r}")
        checkpoints = s.registry.checkpoints(model_id)
        last = {kind: next((c for c in reversed(checkpoints) if c["kind"] == kind), None) for kind in ("training", "sampler")}
        return {"training_run_id": model_id, "base_model": row["base_model"], "model_owner": "local", "is_lora": True,
                "corrupted": False, "lora_rank": row["lora"]["rank"], "last_request_time": iso(row["last_request"]),
                "last_checkpoint": last["training"] and checkpoint_json(last["training"]),
                "last_sampler_checkpoint": last["sampler"] and checkpoint_json(last["sampler"]),
                "user_metadata": {k: str(v) for k, v in row["user_metadata"].items()}}

    @app.get(API + "/training_runs")
    async def training_runs(limit: int = 20, offset: int = 0):
        rows, total = s.registry.models(max(0, min(limit, 1000)), max(0, offset))
        return {"training_runs": [run_json(r["model_id"]) for r in rows],
                "cursor": {"offset": offset, "limit": limit, "total_count": total}}

    @app.get(API + "/training_runs/{model_id}")
    async def training_run(model_id: str):
        return run_json(model_id)

    @app.get(API + "/training_runs/{model_id}/checkpoints")
    async def list_checkpoints(model_id: str):
        run_json(model_id)
        return {"checkpoints": [checkpoint_json(c) for c in s.registry.checkpoints(model_id)]}

    @app.get(API + "/checkpoints")
    async def user_checkpoints():
        return {"checkpoints": [checkpoint_json(c) for c in s.registry.checkpoints()]}

    def _checkpoint_key(model_id: str, checkpoint_id: str) -> tuple[str, str]:
        prefix, _, name = checkpoint_id.partition("/")
        if prefix not in PREFIX_KIND or not name:
            raise UserError(f"malformed checkpoint id {checkpoint_id!r}: want weights/<name>, sampler_weights/<name> or external_weights/<name>")
        return PREFIX_KIND[prefix], name

    @app.delete(API + "/training_runs/{model_id}/checkpoints/{checkpoint_id:path}")
    async def delete_checkpoint(model_id: str, checkpoint_id: str):
        kind, name = _checkpoint_key(model_id, checkpoint_id)
        with unknown_is_404():
            s.registry.delete_checkpoint(model_id, kind, name)
        return {}

    @app.get(API + "/training_runs/{model_id}/checkpoints/{prefix}/{name}/external_weights_urls")
    async def external_weights_urls(model_id: str, prefix: str, name: str):
        kind, name = _checkpoint_key(model_id, f"{prefix}/{name}")
        with unknown_is_404():
            row = s.registry.checkpoint(tinker_path(model_id, kind, name))
        expires = iso(time.time() + 7 * 86400)
        return {"urls": file_urls(Path(row["path"])), "expires": expires}

    @app.put(API + "/training_runs/{model_id}/checkpoints/{prefix}/{name}/ttl")
    async def set_ttl(model_id: str, prefix: str, name: str, request: Request):
        kind, name = _checkpoint_key(model_id, f"{prefix}/{name}")
        ttl = (await read(request, bodies.SetTtl)).ttl_seconds
        with unknown_is_404():
            s.registry.set_expiry(model_id, kind, name, ttl)
        return {}

    @app.post(API + "/weights_info")
    async def weights_info(request: Request):
        path = (await read(request, bodies.WeightsInfo)).tinker_path
        model_id, _, _ = parse_tinker_path(path)
        with unknown_is_404():
            s.registry.checkpoint(path)
        row = s.registry.model(model_id)
        lora = row["lora"]
        return {"base_model": row["base_model"], "is_lora": True, "lora_rank": lora["rank"], "optimizer_config": {"type": "adamw"},
                "train_unembed": lora["train_unembed"], "train_mlp": lora["train_mlp"], "train_attn": lora["train_attn"]}
