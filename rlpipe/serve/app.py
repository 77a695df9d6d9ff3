"""`rlpipe serve`: Tinker's HTTP API (as the official SDK 0.38 speaks it) over rlpipe's
training and sampling primitives, as a FastAPI app.

Submitted calls answer a future id at once (see futures.py); training calls run in their
model's queue (trainers.py), sampling calls concurrently on the sampler (samplers.py).
Bad input is a 4xx with a JSON body, or a future that fails with category "user".
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response

from rlpipe.serve import bodies, rest_routes, sampling_routes, training_routes
from rlpipe.serve.futures import PROTOBUF, Futures, NotFound, UserError
from rlpipe.serve.http import API, TooLarge, error_response, read
from rlpipe.serve.registry import Registry, UnknownPath, tinker_path
from rlpipe.serve.samplers import Samplers
from rlpipe.serve.stability import StabilityStore
from rlpipe.serve.trainers import Trainers, run_job

log = logging.getLogger(__name__)


class Server:
    def __init__(self, bases: dict[str, str], state_dir: Path, *, training_options: dict | None = None,
                 sampler_backend: str | None = None, engine_options: dict | None = None, hold_s: float = 25.0,
                 session_timeout_s: float = 900.0, on_close=None):
        """session_timeout_s: a session without heartbeat (the SDK sends one every 10 s) for this
        long is over: its live models are unloaded, as when it finishes. on_close: called (in a
        thread) last when the app shuts down; `rlpipe serve` stops its child processes there."""
        self.registry = Registry(state_dir)
        self.futures = Futures(hold_s=hold_s)
        self.trainers = Trainers(self.registry, self.futures, bases, training_options or {})
        self.samplers = Samplers(self.registry, self.trainers, sampler_backend, engine_options or {})
        self.stability = StabilityStore()
        self.bases = bases
        self.session_timeout_s = session_timeout_s
        self.on_close = on_close
        self.last_seen: dict[str, float] = {}
        self._tasks: set[asyncio.Task] = set()

    async def reap(self) -> None:
        """Forever: end the sessions whose client went away without finishing them, and delete
        the checkpoints whose ttl_seconds have passed."""
        while True:
            await asyncio.sleep(min(30.0, self.session_timeout_s / 4))
            try:
                await self._reap_once()
            except Exception:  # a bad row must not stop the reaping
                log.exception("reaping sessions and checkpoints failed")

    async def _reap_once(self) -> None:
        for row in self.registry.expired():
            log.info("checkpoint %s expired: deleted", tinker_path(row["model_id"], row["kind"], row["name"]))
            self.registry.delete_checkpoint(row["model_id"], row["kind"], row["name"])
        cutoff = time.monotonic() - self.session_timeout_s
        for session_id in [k for k, t in self.last_seen.items() if t < cutoff]:
            del self.last_seen[session_id]
            gone = await self.trainers.unload_session(session_id)
            if gone:
                log.warning("session %s sent no heartbeat for %.0f s: unloaded %s", session_id,
                            self.session_timeout_s, ", ".join(gone))

    def spawn(self, entry, job) -> None:
        """Run job outside any model queue (sampling); its failure goes to its future."""
        task = asyncio.create_task(run_job(self.futures, entry, job))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await self.trainers.close()
        self.registry.close()
        if self.on_close is not None:
            await asyncio.to_thread(self.on_close)

def create_app(server: Server, api_key: str | None = None, max_body_bytes: int = 256 << 20) -> FastAPI:
    s = server

    @contextlib.asynccontextmanager
    async def lifespan(app):
        task = asyncio.create_task(s.reap(), name="reap sessions and checkpoints")
        task.add_done_callback(lambda t: t.cancelled() or t.exception() is None
                               or log.error("the reaper stopped", exc_info=t.exception()))
        s._tasks.add(task)
        yield
        await s.close()

    app = FastAPI(title="rlpipe Tinker API", docs_url=None, redoc_url=None, lifespan=lifespan)
    app.state.server = server
    app.state.max_body_bytes = max_body_bytes

    @app.middleware("http")
    async def guard(request: Request, call_next):
        if api_key is not None and request.headers.get("x-api-key") != api_key:
            return error_response(401, "wrong or missing X-API-Key")
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > max_body_bytes):
            return error_response(413, f"request body over {max_body_bytes} bytes")
        try:
            return await call_next(request)
        except NotFound as e:
            return error_response(404, str(e))
        except TooLarge as e:
            return error_response(413, str(e))
        except (UserError, UnknownPath, ValueError) as e:
            return error_response(400, str(e))
        except Exception as e:  # a bug of ours: say so, keep serving
            log.exception("%s %s failed", request.method, request.url.path)
            return error_response(500, f"{type(e).__name__}: {e}", category="server")

    @app.exception_handler(RequestValidationError)
    async def bad_query(request: Request, e: RequestValidationError):  # FastAPI's own answer has no "error"
        return error_response(400, "; ".join(f"{'.'.join(map(str, x['loc']))}: {x['msg']}" for x in e.errors()))

    # ------------------------------------------------------------------ session and service

    @app.post(API + "/client/config")
    async def client_config(request: Request):
        return {"pjwt_auth_enabled": False}

    @app.post(API + "/client/dynamic_config")
    async def dynamic_config(request: Request):
        return {}

    @app.get(API + "/healthz")
    async def healthz():
        return {"status": "ok"}

    @app.post(API + "/create_session")
    async def create_session(request: Request):
        body = await read(request, bodies.CreateSession)
        session_id = f"sess-{uuid.uuid4().hex[:12]}"
        s.registry.add_session(session_id, body.tags, body.user_metadata or {})
        s.last_seen[session_id] = time.monotonic()
        return {"session_id": session_id, "type": "create_session"}

    @app.post(API + "/session_heartbeat")
    async def heartbeat(request: Request):
        body = await read(request, bodies.SessionHeartbeat)
        if not s.registry.session_exists(body.session_id):
            raise NotFound(f"unknown session {body.session_id!r}")
        s.last_seen[body.session_id] = time.monotonic()
        return {"type": "session_heartbeat"}

    @app.post(API + "/sessions/{session_id}/finish")
    async def finish_session(session_id: str, request: Request):
        body = await read(request, bodies.FinishSession)
        if not s.registry.session_exists(session_id):
            raise NotFound(f"unknown session {session_id!r}")
        s.registry.finish_session(session_id, body.reason.type)
        s.last_seen.pop(session_id, None)
        await s.trainers.unload_session(session_id)  # its checkpoints stay
        return {}

    @app.post(API + "/telemetry")
    async def telemetry(request: Request):
        return {"status": "accepted"}

    @app.get(API + "/get_server_capabilities")
    async def capabilities():
        models = []
        for name, directory in s.bases.items():
            config = json.loads((Path(directory) / "config.json").read_text())
            models.append({"model_name": name, "max_context_length": config.get("max_position_embeddings"),
                           "trainable": True, "sampleable": True})
        return {"supported_models": models}
    training_routes.register(app, s)
    sampling_routes.register(app, s)
    rest_routes.register(app, s)

    # ------------------------------------------------------------------ futures

    @app.post(API + "/retrieve_future")
    async def retrieve_future(request: Request):
        body = await read(request, bodies.RetrieveFuture)
        entry = s.futures.get(body.request_id)
        if entry is None:
            raise NotFound(f"unknown request_id {body.request_id!r}")
        if not await s.futures.wait(entry):
            return JSONResponse({"type": "try_again", "request_id": entry.request_id, "queue_state": "active"}, status_code=408)
        if entry.error is not None:
            return JSONResponse(entry.error)
        if isinstance(entry.body, bytes):
            return Response(entry.body, media_type=PROTOBUF)
        return JSONResponse(entry.body)
    return app
