"""Reading requests and writing answers the way Tinker's SDK expects: every refusal is a
JSON body with "error" (and "category"), never an empty 4xx."""

from __future__ import annotations

import datetime
from typing import TypeVar

from fastapi import Request
from fastapi.responses import JSONResponse

from rlpipe.serve import bodies
from rlpipe.serve.futures import NotFound, UserError

API = "/api/v1"
T = TypeVar("T")


class TooLarge(UserError):
    """A body over the server's limit: HTTP 413."""


def iso(ts: float | None) -> str | None:
    return None if ts is None else datetime.datetime.fromtimestamp(ts, datetime.UTC).isoformat()


def error_response(status: int, message: str, category: str = "user") -> JSONResponse:
    return JSONResponse({"error": message, "category": category, "detail": message}, status_code=status)


async def read_body(request: Request) -> bytes:
    """The body, read up to the server's limit (a chunked body has no Content-Length to check first)."""
    limit = request.app.state.max_body_bytes
    parts, size = [], 0
    async for part in request.stream():
        size += len(part)
        if size > limit:
            raise TooLarge(f"request body over {limit} bytes")
        parts.append(part)
    return b"".join(parts)


async def read(request: Request, kind: type[T]) -> T:
    """The JSON body as kind (a Struct of bodies.py): a UserError naming the field if it does not fit."""
    return bodies.decode(await read_body(request), kind)


def known_session(registry, session_id: str) -> None:
    """Refuse a session that does not exist (404) or has finished (400)."""
    if not registry.session_exists(session_id):
        raise NotFound(f"unknown session {session_id!r}: create_session first")
    if registry.session_finished(session_id):
        raise UserError(f"session {session_id!r} has finished: create a new ServiceClient")


def future_reply(entry) -> dict:
    return {"request_id": entry.request_id}
