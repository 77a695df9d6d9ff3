"""Metrics: one JSON object per line, flushed per record, so a crash loses at most a line;
the same figures as TensorBoard events, and in W&B or trackio when configured."""

from __future__ import annotations

import json
import logging as _logging
import math
from pathlib import Path
from typing import Callable, Iterable

log = _logging.getLogger(__name__)


def mean_of(values: Iterable[float | None]) -> float:
    present = [float(v) for v in values if v is not None]
    return sum(present) / len(present) if present else math.nan


def window_mean(records: list[dict], value: Callable[[dict], float | None], first: bool) -> float:
    """mean_of value(record) over the first or the last quarter of the records: how the
    recipes compare the start of a run with its end."""
    k = max(1, len(records) // 4)
    return mean_of(value(r) for r in (records[:k] if first else records[-k:]))


RENAMED = {
    "learner/idle_frac": "time/learner_idle_frac",
    "explorer/sampler_busy_frac": "time/sampler_busy_frac",
    "explorer/weight_sync_latency_s": "sync/weight_latency_s",
    "groups": "buffer/groups",  # in the step's batch
    "trajectories": "buffer/trajectories",
}
AGGREGATES = ("mean", "sum", "min", "max")


def grouped_name(key: str) -> str:
    """The name a metric is logged under: grouped by its first path part (reward/, env/,
    loss/, kl/, optim/, time/, sync/, buffer/, staleness/, eval/, tokens/, explorer/), as
    TensorBoard and W&B sections show them. The training client keeps Tinker's names
    ("loss:sum", "kl_sampler_learner:mean", "grad_norm:mean"); they map here:
    "loss:sum" -> loss/sum, "ratio:min" -> loss/ratio_min, "clip_frac:mean" -> loss/clip_frac,
    "kl_sampler_learner:mean" -> kl/sampler_learner, "grad_norm:mean" -> optim/grad_norm,
    "dropped/stale" -> buffer/dropped_stale."""
    if key in RENAMED:
        return RENAMED[key]
    if key.startswith("dropped/"):
        return "buffer/dropped_" + key.split("/", 1)[1]
    name, colon, agg = key.partition(":")
    if not colon or "/" in name or agg not in AGGREGATES:
        return key
    if name == "loss":
        return "loss/sum"
    suffix = f"_{agg}" if agg in ("min", "max") else ""
    if name.startswith("kl_"):
        return f"kl/{name[3:]}{suffix}"
    if name in ("grad_norm", "lr"):
        return f"optim/{name}{suffix}"
    return f"loss/{name}{suffix}"


def grouped(record: dict) -> dict:
    return {grouped_name(k): v for k, v in record.items()}


class MetricsWriter:
    """metrics.jsonl (the record of the run), TensorBoard event files in <its dir>/tensorboard,
    and W&B / trackio where [logging] names a project and the package is installed. Names are
    grouped (grouped_name); the x axis is the record's "step". A tracker that fails is
    logged and dropped: it never stops the learner."""

    def __init__(self, path: str | Path, *, logging=None, run_name: str = "", run_id: str = "",
                 run_config: dict | None = None, tensorboard: bool = True, resume_step: int | None = None):
        """run_id: the run directory's id; a resumed learner continues the same W&B / trackio
        run (empty: a new one each time). resume_step: the step a resumed learner continues
        after; TensorBoard forgets what an earlier incarnation logged beyond it, so a step
        never shows twice."""
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "a", buffering=1)
        self._trackers: dict[str, object] = {}
        if tensorboard:
            self._start("tensorboard", lambda: _TensorBoard(self.path.parent / "tensorboard", resume_step))
        if logging is not None and logging.wandb_project:
            self._start("wandb", lambda: _wandb(logging, run_name, run_id, run_config, self.path.parent))
        if logging is not None and logging.trackio_project:
            self._start("trackio", lambda: _trackio(logging, run_name, run_id, run_config))

    def _start(self, name: str, make) -> None:
        try:
            self._trackers[name] = make()
        except Exception as err:  # noqa: BLE001  (a tracker is optional; the run is not)
            log.warning("metrics: %s is off: %s: %s", name, type(err).__name__, err)

    def write(self, record: dict) -> None:
        record = grouped(record)
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        self._file.write(json.dumps(clean) + "\n")
        step = int(record.get("step", 0))
        scalars = {k: float(v) for k, v in clean.items()
                   if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool) and v is not None}
        for name, tracker in list(self._trackers.items()):
            try:
                tracker.log(scalars, step)
            except Exception as err:  # noqa: BLE001
                log.warning("metrics: %s failed and is off from now on: %s: %s", name, type(err).__name__, err)
                self._trackers.pop(name)

    def close(self) -> None:
        self._file.close()
        for name, tracker in self._trackers.items():
            try:
                tracker.close()
            except Exception as err:  # noqa: BLE001
                log.warning("metrics: closing %s: %s", name, err)
        self._trackers.clear()


class _TensorBoard:
    def __init__(self, log_dir: Path, resume_step: int | None = None):
        from torch.utils.tensorboard import SummaryWriter

        purge = None if resume_step is None else resume_step + 1
        self.writer = SummaryWriter(log_dir=str(log_dir), flush_secs=10, purge_step=purge)

    def log(self, scalars: dict[str, float], step: int) -> None:
        walltime = scalars.get("time_end")
        for key, value in scalars.items():
            if key not in ("time", "time_end"):
                self.writer.add_scalar(key, value, global_step=step, walltime=walltime)

    def close(self) -> None:
        self.writer.close()


class _Module:
    """wandb and trackio share the calls used here: init, log(dict, step=), finish."""

    def __init__(self, module, run):
        self.module, self.run = module, run

    def log(self, scalars: dict[str, float], step: int) -> None:
        self.module.log({k: v for k, v in scalars.items() if k not in ("time", "time_end")}, step=step)

    def close(self) -> None:
        self.module.finish()


def _wandb(logging, run_name: str, run_id: str, run_config: dict | None, run_dir: Path) -> _Module:
    import wandb

    run = wandb.init(project=logging.wandb_project, entity=logging.wandb_entity or None, name=run_name or None,
                     config=run_config, dir=str(run_dir), id=run_id or None, resume="allow")
    return _Module(wandb, run)


def _trackio(logging, run_name: str, run_id: str, run_config: dict | None) -> _Module:
    import trackio

    # Named by the run id as well: a later run of the same name (a replaced demo) is another run.
    name = f"{run_name or 'run'}-{run_id}" if run_id else (run_name or "run")
    run = trackio.init(project=logging.trackio_project, name=name, config=run_config, resume="allow")
    return _Module(trackio, run)


def read_metrics(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line being written right now
        if isinstance(record, dict):
            records.append(grouped(record))  # a run from before the grouped names reads the same
    return records
