"""Metrics: one JSON object per line, flushed per record, so a crash loses at most a line."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Callable, Iterable


def mean_of(values: Iterable[float | None]) -> float:
    present = [float(v) for v in values if v is not None]
    return sum(present) / len(present) if present else math.nan


def window_mean(records: list[dict], value: Callable[[dict], float | None], first: bool) -> float:
    """mean_of value(record) over the first or the last quarter of the records: how the
    recipes compare the start of a run with its end."""
    k = max(1, len(records) // 4)
    return mean_of(value(r) for r in (records[:k] if first else records[-k:]))


class MetricsWriter:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "a", buffering=1)

    def write(self, record: dict) -> None:
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        self._file.write(json.dumps(clean) + "\n")

    def close(self) -> None:
        self._file.close()


def read_metrics(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            pass  # a line being written right now
    return records
