"""A real `rlpipe serve` process on loopback, for tests that drive it with the official tinker SDK."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

API_KEY = "tml-rlpipe-test"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServeProcess:
    def __init__(self, model: str, state_dir: Path, *extra: str, api_key: str | None = API_KEY):
        self.model, self.state_dir, self.extra, self.api_key = model, Path(state_dir), extra, api_key
        self.port = free_port()
        self.proc: subprocess.Popen | None = None
        self.log = self.state_dir.parent / f"{self.state_dir.name}-server.log"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 120.0) -> None:
        cmd = [sys.executable, "-m", "rlpipe.cli", "serve", "--model", self.model, "--dir", str(self.state_dir),
               "--port", str(self.port), *self.extra]
        if self.api_key:
            cmd += ["--api-key", self.api_key]
        from rlpipe.pipeline.launch import LAUNCHER_ENV

        # The server stops (SIGTERM, engines and all) if this process dies without stopping it.
        env = dict(os.environ, HF_HUB_OFFLINE="1", **{LAUNCHER_ENV: str(os.getpid())})
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"rlpipe serve exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                if httpx.get(self.url + "/api/v1/healthz", headers=self.headers(), timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        self.stop()
        raise TimeoutError(f"rlpipe serve did not answer within {timeout_s} s:\n{self.log_tail()}")

    def headers(self) -> dict:
        return {"X-API-Key": self.api_key} if self.api_key else {}

    def stop(self, timeout_s: float = 30.0) -> list[int]:
        """SIGTERM, as a service manager stops it; the processes of the server's group still
        alive 5 s after it exited (its vLLM engine, ...), killed before returning (also when
        the server had died already)."""
        from rlpipe.pipeline.launch import group_members

        if self.proc is None:
            return []
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        deadline = time.monotonic() + 5
        while (left := group_members(self.proc.pid)) and time.monotonic() < deadline:
            time.sleep(0.2)
        for pid in left:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        return left

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_tail(self, n: int = 40) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:]) if self.log.exists() else ""

    def client_env(self) -> dict:
        return {"TINKER_BASE_URL": self.url, "TINKER_API_KEY": self.api_key or "tml-local", "TINKER_TELEMETRY": "0"}
