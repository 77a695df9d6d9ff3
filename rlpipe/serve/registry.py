"""What `rlpipe serve` has issued, on disk: sessions, models, checkpoints and samplers.

Everything a client may come back for after a server restart lives here (SQLite, WAL) or
in the files it points at, so every `tinker://` path the server has handed out keeps
resolving. Live training state (the adapter in memory, its optimizer) does not survive a
restart; a checkpoint of it does.
"""

from __future__ import annotations

import json
import shutil
import sqlite3
import time
from pathlib import Path

KIND_PREFIX = {"training": "weights", "sampler": "sampler_weights", "external": "external_weights"}
PREFIX_KIND = {v: k for k, v in KIND_PREFIX.items()}

SCHEMA = """
CREATE TABLE IF NOT EXISTS sessions (
    session_id TEXT PRIMARY KEY, created REAL NOT NULL, tags TEXT NOT NULL, user_metadata TEXT NOT NULL,
    finished REAL, reason TEXT);
CREATE TABLE IF NOT EXISTS models (
    model_id TEXT PRIMARY KEY, session_id TEXT NOT NULL, base_model TEXT NOT NULL, lora TEXT NOT NULL,
    user_metadata TEXT NOT NULL, created REAL NOT NULL, last_request REAL NOT NULL);
CREATE TABLE IF NOT EXISTS checkpoints (
    model_id TEXT NOT NULL, kind TEXT NOT NULL, name TEXT NOT NULL, path TEXT NOT NULL, created REAL NOT NULL,
    size_bytes INTEGER NOT NULL, expires REAL, PRIMARY KEY (model_id, kind, name));
CREATE TABLE IF NOT EXISTS samplers (
    sampler_id TEXT PRIMARY KEY, base_model TEXT NOT NULL, model_path TEXT, adapter_dir TEXT, created REAL NOT NULL);
"""


class UnknownPath(LookupError):
    pass


def tinker_path(model_id: str, kind: str, name: str) -> str:
    return f"tinker://{model_id}/{KIND_PREFIX[kind]}/{name}"


def parse_tinker_path(path: str) -> tuple[str, str, str]:
    """(model_id, kind, name) of tinker://<model_id>/<weights|sampler_weights|external_weights>/<name>."""
    if not isinstance(path, str) or not path.startswith("tinker://"):
        raise ValueError(f"not a tinker:// path: {path!r}")
    parts = path.removeprefix("tinker://").split("/")
    if len(parts) != 3 or parts[1] not in PREFIX_KIND or not parts[0] or not parts[2]:
        raise ValueError(f"malformed tinker path {path!r}: want tinker://<run id>/<weights|sampler_weights|external_weights>/<name>")
    return parts[0], PREFIX_KIND[parts[1]], parts[2]


def dir_size(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


class Registry:
    def __init__(self, state_dir: Path):
        self.state_dir = Path(state_dir)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(self.state_dir / "registry.sqlite", check_same_thread=False, isolation_level=None)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")
        self.db.executescript(SCHEMA)
        self.db.row_factory = sqlite3.Row

    def close(self) -> None:
        self.db.close()

    def model_dir(self, model_id: str) -> Path:
        """Where a model's checkpoints go (ids hold ':', which some file systems refuse)."""
        return self.state_dir / "runs" / model_id.replace(":", "_")

    # ------------------------------------------------------------------ sessions

    def add_session(self, session_id: str, tags: list, user_metadata: dict) -> None:
        self.db.execute("INSERT OR IGNORE INTO sessions VALUES (?, ?, ?, ?, NULL, NULL)",
                        (session_id, time.time(), json.dumps(tags), json.dumps(user_metadata)))

    def session_exists(self, session_id: str) -> bool:
        return self.db.execute("SELECT 1 FROM sessions WHERE session_id = ?", (session_id,)).fetchone() is not None

    def session_finished(self, session_id: str) -> bool:
        row = self.db.execute("SELECT finished FROM sessions WHERE session_id = ?", (session_id,)).fetchone()
        return row is not None and row[0] is not None

    def finish_session(self, session_id: str, reason: str) -> None:
        self.db.execute("UPDATE sessions SET finished = ?, reason = ? WHERE session_id = ?", (time.time(), reason, session_id))

    # ------------------------------------------------------------------ models

    def add_model(self, model_id: str, session_id: str, base_model: str, lora: dict, user_metadata: dict) -> None:
        now = time.time()
        self.db.execute("INSERT OR REPLACE INTO models VALUES (?, ?, ?, ?, ?, ?, ?)",
                        (model_id, session_id, base_model, json.dumps(lora), json.dumps(user_metadata), now, now))

    def model(self, model_id: str) -> dict | None:
        row = self.db.execute("SELECT * FROM models WHERE model_id = ?", (model_id,)).fetchone()
        if row is None:
            return None
        out = dict(row)
        out["lora"], out["user_metadata"] = json.loads(out["lora"]), json.loads(out["user_metadata"])
        return out

    def models(self, limit: int, offset: int) -> tuple[list[dict], int]:
        total = self.db.execute("SELECT COUNT(*) FROM models").fetchone()[0]
        ids = [r[0] for r in self.db.execute("SELECT model_id FROM models ORDER BY created DESC LIMIT ? OFFSET ?", (limit, offset))]
        return [self.model(i) for i in ids], total

    def touch(self, model_id: str) -> None:
        self.db.execute("UPDATE models SET last_request = ? WHERE model_id = ?", (time.time(), model_id))

    # ------------------------------------------------------------------ checkpoints

    def add_checkpoint(self, model_id: str, kind: str, name: str, path: Path, ttl_s: float | None = None) -> str:
        now = time.time()
        self.db.execute("INSERT OR REPLACE INTO checkpoints VALUES (?, ?, ?, ?, ?, ?, ?)",
                        (model_id, kind, name, str(path), now, dir_size(path), now + ttl_s if ttl_s else None))
        return tinker_path(model_id, kind, name)

    def checkpoint(self, path: str) -> dict:
        """The checkpoint row of a tinker:// path; UnknownPath if this server never issued it
        (or it was deleted), ValueError if the path is malformed."""
        model_id, kind, name = parse_tinker_path(path)
        row = self.db.execute("SELECT * FROM checkpoints WHERE model_id = ? AND kind = ? AND name = ?",
                              (model_id, kind, name)).fetchone()
        if row is None or not Path(row["path"]).exists():
            raise UnknownPath(f"no checkpoint {path} on this server")
        return dict(row)

    def checkpoints(self, model_id: str | None = None) -> list[dict]:
        if model_id is None:
            rows = self.db.execute("SELECT * FROM checkpoints ORDER BY created")
        else:
            rows = self.db.execute("SELECT * FROM checkpoints WHERE model_id = ? ORDER BY created", (model_id,))
        return [dict(r) for r in rows]

    def set_expiry(self, model_id: str, kind: str, name: str, ttl_s: float | None) -> None:
        """Set when a checkpoint expires (None: never); expired ones are deleted (Server.reap)."""
        self.checkpoint(tinker_path(model_id, kind, name))
        self.db.execute("UPDATE checkpoints SET expires = ? WHERE model_id = ? AND kind = ? AND name = ?",
                        (time.time() + ttl_s if ttl_s else None, model_id, kind, name))

    def expired(self) -> list[dict]:
        rows = self.db.execute("SELECT * FROM checkpoints WHERE expires IS NOT NULL AND expires < ?", (time.time(),))
        return [dict(r) for r in rows]

    def delete_checkpoint(self, model_id: str, kind: str, name: str) -> None:
        row = self.checkpoint(tinker_path(model_id, kind, name))
        self.db.execute("DELETE FROM checkpoints WHERE model_id = ? AND kind = ? AND name = ?", (model_id, kind, name))
        shutil.rmtree(row["path"], ignore_errors=True)

    # ------------------------------------------------------------------ samplers

    def add_sampler(self, sampler_id: str, base_model: str, model_path: str | None, adapter_dir: Path | None) -> None:
        self.db.execute("INSERT OR REPLACE INTO samplers VALUES (?, ?, ?, ?, ?)",
                        (sampler_id, base_model, model_path, str(adapter_dir) if adapter_dir else None, time.time()))

    def sampler(self, sampler_id: str) -> dict | None:
        row = self.db.execute("SELECT * FROM samplers WHERE sampler_id = ?", (sampler_id,)).fetchone()
        return dict(row) if row else None
