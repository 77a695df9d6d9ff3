"""`rlpipe plot RUN_DIR [--out FILE.png]`: a run's curves on one page, from its metrics.jsonl.

Nine panels (reward, accuracy, loss, KL, importance ratio, staleness, throughput, learner idle
vs sampler busy, lr and entropy). Every key is read through metrics.grouped_name, so runs
written with the older names ("loss:sum", "learner/idle_frac", ...) plot the same. A metric a
run did not log leaves its panel saying "no data": the pipeline calls plot_run at the end of
every run, and a missing curve must never cost the user the others.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np

from rlpipe.metrics import read_metrics

METRICS_FILE = "metrics.jsonl"
DEFAULT_OUT = "curves.png"


def read_records(run_dir: str | Path, command: str = "plot") -> list[dict]:
    """The run's metric records with grouped names. User errors (no such directory, no
    metrics file, no records) raise SystemExit with one line naming the command."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise SystemExit(f"rlpipe {command}: {run_dir} is not a directory")
    path = run_dir / METRICS_FILE
    if not path.is_file():
        raise SystemExit(f"rlpipe {command}: {path} does not exist (has the learner finished a step yet?)")
    records = read_metrics(path)  # grouped names, old runs' too; lines that are not objects left out
    if not records:
        raise SystemExit(f"rlpipe {command}: {path} holds no metric records yet")
    return records


def number(value) -> float | None:
    """A finite float, or None for anything else (null, NaN written by another tool, text)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    try:
        value = float(value)
    except OverflowError:  # an int beyond float range
        return None
    return value if math.isfinite(value) else None


def step_of(record: dict, position: int) -> float:
    """The record's step; a record without a usable one is placed by its position (from 1),
    so a damaged step never hides its values."""
    step = number(record.get("step"))
    return step if step is not None else position + 1


def series(records: list[dict], name: str) -> tuple[np.ndarray, np.ndarray]:
    """(steps, values) of one metric over the records that have it, in step order. A learner
    restarted from its checkpoint logs the steps after it again: the later record of a step
    is the one that counts, so a resumed run draws one line, not a zig-zag back in time."""
    by_step = {}
    for i, record in enumerate(records):
        value = number(record.get(name))
        if value is not None:
            by_step[step_of(record, i)] = value
    steps = sorted(by_step)
    return np.asarray(steps, dtype=float), np.asarray([by_step[s] for s in steps], dtype=float)


def rolling_mean(y: np.ndarray, window: int) -> np.ndarray:
    """Trailing mean over up to `window` points; the first points average what there is."""
    sums = np.cumsum(np.insert(y, 0, 0.0))
    counts = np.minimum(np.arange(1, len(y) + 1), window)
    ends = np.arange(1, len(y) + 1)
    return (sums[ends] - sums[ends - counts]) / counts


def plot_run(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Draw the run's curves to `out` (default RUN_DIR/curves.png) and return its path."""
    records = read_records(run_dir)
    run_dir = Path(run_dir)
    out = Path(out) if out is not None else run_dir / DEFAULT_OUT

    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    # A Figure on its own Agg canvas, not pyplot: no display needed (headless machines), no
    # global figure registry to leak into, and the caller's backend (a notebook's) untouched.
    fig = Figure(figsize=(16, 10.5), dpi=100, layout="constrained")
    supported = FigureCanvasAgg(fig).get_supported_filetypes()
    if out.suffix.lstrip(".").lower() not in supported:
        raise SystemExit(f"rlpipe plot: cannot write {out}: the name must end in one of "
                         f"{', '.join('.' + s for s in sorted(supported))}")
    axes = fig.subplots(3, 3, sharex=True)
    for ax, draw in zip(axes.flat, PANELS):
        draw(ax, records)
    axes[0, 0].xaxis.set_major_locator(MaxNLocator(integer=True, steps=[1, 2, 2.5, 5, 10]))  # shared: no step 2.5
    for ax in axes[-1]:
        ax.set_xlabel("step")
        ax.xaxis.set_tick_params(labelbottom=True)  # sharex hides them where a "no data" panel sits
    fig.suptitle(_title(run_dir, records), fontsize=14)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(out)
    except OSError as err:
        raise SystemExit(f"rlpipe plot: cannot write {out}: {err.strerror or err}") from None
    return out


def main(args) -> None:
    """The CLI: args.run_dir, args.out (None = RUN_DIR/curves.png)."""
    print(plot_run(args.run_dir, args.out))


# --------------------------------------------------------------------------- panels


def _title(run_dir: Path, records: list[dict]) -> str:
    steps, _ = series(records, "step")
    name = run_dir.resolve().name
    if len(steps):
        title = f"{name}: steps {int(steps.min())}-{int(steps.max())} ({len(records)} records)"
    else:
        title = f"{name}: {len(records)} records"
    _, starts = series(records, "time")
    _, ends = series(records, "time_end")
    if len(starts):
        last = ends[-1] if len(ends) else starts[-1]
        took = last - starts[0]
        took_text = f"{took:.0f} s" if took < 120 else f"{took / 60:.1f} min" if took < 7200 else f"{took / 3600:.1f} h"
        title += f", {took_text}, last step {time.strftime('%Y-%m-%d %H:%M', time.localtime(last))}"
    return title


def _line(ax, records, name, label=None, **style) -> bool:
    x, y = series(records, name)
    if not len(y):
        return False
    # One point draws no line: a marker keeps a lone eval or a one-step run visible.
    marker = style.pop("marker", "o" if len(y) == 1 else None)
    ax.plot(x, y, label=label or name, marker=marker, **style)
    return True


def _no_data(ax, names) -> None:
    ax.text(0.5, 0.5, "no data\n(" + ", ".join(names) + ")", transform=ax.transAxes,
            ha="center", va="center", color="0.5", fontsize=9)
    ax.set_yticks([])


def _finish(ax, title, drew, names, *twins) -> None:
    ax.set_title(title, fontsize=11)
    if not drew:
        _no_data(ax, names)
        return
    ax.grid(alpha=0.3)
    handles, labels = [], []
    for a in (ax, *twins):
        h, l = a.get_legend_handles_labels()
        handles += h
        labels += l
    if handles:
        ax.legend(handles, labels, fontsize=8, loc="best")


def _log_if_wide(ax, records, names) -> None:
    """Log scale when the curves are all positive and span over two decades (a KL that
    starts at 1e-9 and grows to 1e-3 is a flat line on a linear axis)."""
    values = np.concatenate([series(records, n)[1] for n in names])
    if len(values) and values.min() > 0 and values.max() / values.min() > 100:
        ax.set_yscale("log")


def _with_rolling(ax, records, name, label, color) -> bool:
    x, y = series(records, name)
    if not len(y):
        return False
    window = max(1, len(y) // 10)
    # Faint raw values under a bold rolling mean; with too few points for a mean, just the values.
    ax.plot(x, y, color=color, alpha=0.35 if window > 1 else 1.0, lw=1 if window > 1 else 1.5, label=label,
            marker="o" if len(y) == 1 else None)
    if window > 1:
        ax.plot(x, rolling_mean(y, window), color=color, lw=2, label=f"{label} (mean of {window})")
    return True


def reward_panel(ax, records) -> None:
    drew = _with_rolling(ax, records, "reward/mean", "reward/mean", "C0")
    _finish(ax, "reward", drew, ["reward/mean"])


def accuracy_panel(ax, records) -> None:
    drew = _with_rolling(ax, records, "env/correct", "env/correct (sampled)", "C2")
    drew |= _line(ax, records, "eval/accuracy", "eval/accuracy (greedy)", color="C3", marker="o", ms=4)
    if drew:
        ax.set_ylim(-0.02, 1.02)
    _finish(ax, "accuracy", drew, ["env/correct", "eval/accuracy"])


def loss_panel(ax, records) -> None:
    drew = _line(ax, records, "loss/sum", color="C0", lw=1)
    twin = None
    if len(series(records, "optim/grad_norm")[1]):
        twin = ax.twinx()
        twin.set_ylabel("grad norm", color="C1", fontsize=9)
        drew |= _line(twin, records, "optim/grad_norm", color="C1", lw=1, alpha=0.7)
    _finish(ax, "loss and grad norm", drew, ["loss/sum", "optim/grad_norm"], *([twin] if twin else []))


def kl_panel(ax, records) -> None:
    names = ["kl/sampler_learner", "kl/ref"]
    drew = _line(ax, records, names[0], "kl/sampler_learner (mismatch)", color="C4")
    drew |= _line(ax, records, names[1], "kl/ref (to base model)", color="C5")
    if drew:
        _log_if_wide(ax, records, names)
    _finish(ax, "KL", drew, names)


def ratio_panel(ax, records) -> None:
    x_lo, lo = series(records, "loss/ratio_min")
    x_hi, hi = series(records, "loss/ratio_max")
    drew = False
    if len(lo) and len(lo) == len(hi) and np.array_equal(x_lo, x_hi):
        ax.fill_between(x_lo, lo, hi, color="C0", alpha=0.25, label="min..max")
        drew = True
    else:  # logged apart (a partial file): draw each alone
        drew |= _line(ax, records, "loss/ratio_min", "min", color="C0", lw=1)
        drew |= _line(ax, records, "loss/ratio_max", "max", color="C0", lw=1, ls="--")
    drew |= _line(ax, records, "loss/ratio", "mean", color="C0", lw=1.5)
    if drew:
        ax.axhline(1.0, color="0.4", lw=0.8, ls=":")
        _log_if_wide(ax, records, ["loss/ratio_min", "loss/ratio_max"])
    _finish(ax, "importance ratio (learner / sampler)", drew, ["loss/ratio_min", "loss/ratio_max"])


def staleness_panel(ax, records) -> None:
    """The share of each batch sampled k versions behind the learner (staleness/<k> counts)."""
    ks = sorted({int(name.split("/", 1)[1]) for r in records for name in r
                 if name.startswith("staleness/") and name.split("/", 1)[1].isdigit()})
    drew = False
    if ks:
        by_step = {}  # the later record of a step counts, as in series()
        for i, record in enumerate(records):
            row = [number(record.get(f"staleness/{k}")) or 0.0 for k in ks]
            if sum(row) > 0:
                by_step[step_of(record, i)] = row
        if by_step:
            steps = sorted(by_step)
            counts = np.asarray([by_step[s] for s in steps])
            shares = counts / counts.sum(axis=1, keepdims=True)
            colors = [matplotlib_color(i, len(ks)) for i in range(len(ks))]
            # step="mid": each step's batch is one block, not a slope between neighbouring steps.
            ax.stackplot(steps, shares.T, labels=[f"k={k}" for k in ks], colors=colors, alpha=0.8, step="mid")
            ax.set_ylim(0, 1)
            ax.set_ylabel("share of batch", fontsize=9)
            drew = True
    if not drew:  # only the maximum was logged
        drew = _line(ax, records, "staleness/max", color="C1", drawstyle="steps-post")
    _finish(ax, "staleness (versions behind)", drew, ["staleness/<k>", "staleness/max"])


def matplotlib_color(i: int, n: int):
    from matplotlib import colormaps

    return colormaps["viridis"](i / max(n - 1, 1) * 0.85)  # stop short of the palest yellow


def throughput_panel(ax, records) -> None:
    drew = _line(ax, records, "tokens/sampled_per_s", "sampled", color="C0")
    drew |= _line(ax, records, "tokens/trained_per_s", "trained", color="C1")
    if drew:
        ax.set_ylabel("tokens / s", fontsize=9)
    _finish(ax, "throughput", drew, ["tokens/sampled_per_s", "tokens/trained_per_s"])


def utilisation_panel(ax, records) -> None:
    drew = _line(ax, records, "time/learner_idle_frac", "learner idle", color="C3")
    drew |= _line(ax, records, "time/sampler_busy_frac", "sampler busy", color="C2")
    if drew:
        ax.set_ylim(-0.02, 1.02)
    _finish(ax, "learner idle vs sampler busy", drew, ["time/learner_idle_frac", "time/sampler_busy_frac"])


def lr_entropy_panel(ax, records) -> None:
    drew = _line(ax, records, "optim/lr", "optim/lr", color="C0")
    target = ax.twinx() if drew and len(series(records, "loss/entropy")[1]) else ax
    entropy = _line(target, records, "loss/entropy", "loss/entropy", color="C1")
    if target is not ax:
        target.set_ylabel("entropy", color="C1", fontsize=9)
    if drew:
        ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
    _finish(ax, "learning rate and entropy", drew or entropy, ["optim/lr", "loss/entropy"],
            *([target] if target is not ax else []))


PANELS = (reward_panel, accuracy_panel, loss_panel, kl_panel, ratio_panel, staleness_panel,
          throughput_panel, utilisation_panel, lr_entropy_panel)
