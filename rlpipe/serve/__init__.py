"""`rlpipe serve`: Tinker's HTTP API on your own machine, for the official `tinker` SDK
(0.38) and tinker-cookbook, unchanged:

    rlpipe serve --model /models/Qwen3-0.6B --dir state/        # then, client side:
    TINKER_BASE_URL=http://127.0.0.1:8000 TINKER_API_KEY=tml-local python my_script.py

app.py holds the server and the session endpoints, training_routes.py / sampling_routes.py /
rest_routes.py the others; trainers.py the per-model queues over SharedBase-backed
TrainingClients, samplers.py the sampling sessions, registry.py what survives a restart,
futures.py the long-poll future protocol, bodies.py the JSON request bodies (one msgspec
Struct each), wire.py the protobuf bodies, http.py the reading of requests and the error answers.
"""

from __future__ import annotations

import logging
from pathlib import Path

log = logging.getLogger(__name__)


def parse_models(items: list[str]) -> dict[str, str]:
    """--model DIR or --model NAME=DIR -> {name clients use as base_model: local directory}.
    A bare DIR is served under its absolute path."""
    out = {}
    for item in items:
        name, sep, directory = item.partition("=")
        if not sep:
            name = directory = str(Path(item).absolute())
        if not (Path(directory) / "config.json").exists():
            raise SystemExit(f"rlpipe serve: {directory} is not a Hugging Face model directory (no config.json)")
        out[name] = str(Path(directory).absolute())
    return out


def serve(models: dict[str, str], state_dir: str, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
          *, training_options: dict | None = None, sampler_backend: str | None = None, engine_options: dict | None = None,
          hold_s: float = 25.0, max_body_bytes: int = 256 << 20, session_timeout_s: float = 900.0) -> None:
    import uvicorn

    from rlpipe.serve.app import Server, create_app

    server = Server(models, Path(state_dir), training_options=training_options, sampler_backend=sampler_backend,
                    engine_options=engine_options, hold_s=hold_s, session_timeout_s=session_timeout_s,
                    # In the app's shutdown, not after uvicorn.run returns: on SIGTERM uvicorn
                    # re-raises the signal once the app has shut down, and the process dies there.
                    on_close=stop_children)
    app = create_app(server, api_key=api_key, max_body_bytes=max_body_bytes)
    log.info("serving %s on http://%s:%d (state in %s)", ", ".join(models), host, port, state_dir)
    try:
        uvicorn.run(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=5)
    finally:
        stop_children()


def stop_children(grace_s: float = 10.0) -> None:
    """Shut the sampling engines down, then kill whatever child process is left: an engine core
    that outlives the server would hold its memory (~1 GB a small model on CPU) for good."""
    import os
    import signal
    import time

    from rlpipe.sampling import shutdown_engines

    shutdown_engines()
    deadline = time.monotonic() + grace_s
    while (children := _children(os.getpid())) and time.monotonic() < deadline:
        time.sleep(0.2)
    for pid in children:
        log.warning("child process %d still runs after shutdown: killed", pid)
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _children(parent: int) -> list[int]:
    from rlpipe.pipeline.launch import live_processes

    out = []
    for pid in live_processes(parent=parent):
        try:
            command = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if b"resource_tracker" not in command:  # multiprocessing's tracker leaves with us
            out.append(pid)
    return out
