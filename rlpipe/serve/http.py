"""Reading requests and writing answers the way Tinker's SDK expects: every refusal is a
JSON body with "error" (and "category"), never an empty 4xx."""

from __future__ import annotations

import datetime
import json

from fastapi import Request
from fastapi.responses import JSONResponse

from rlpipe.serve.futures import NotFound, UserError

API = "/api/v1"


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


async def read_json(request: Request) -> dict:
    try:
        body = json.loads(await read_body(request))
    except (ValueError, UnicodeDecodeError) as e:
        raise UserError(f"malformed JSON body: {e}") from None
    if not isinstance(body, dict):
        raise UserError("the JSON body must be an object")
    return body


def field(body: dict, name: str, kind: type | tuple, required: bool = True, default=None):
    value = body.get(name, default)
    if value is None:
        if required:
            raise UserError(f"missing field {name!r}")
        return default
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise UserError(f"field {name!r} has the wrong type: {value!r}")
    return value


def known_session(registry, body: dict) -> str:
    session_id = field(body, "session_id", str)
    if not registry.session_exists(session_id):
        raise NotFound(f"unknown session {session_id!r}: create_session first")
    if registry.session_finished(session_id):
        raise UserError(f"session {session_id!r} has finished: create a new ServiceClient")
    return session_id


def future_reply(entry) -> dict:
    return {"request_id": entry.request_id}
