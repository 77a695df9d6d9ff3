"""window_mean: the first vs last quarter of a run's records, as the recipes report them."""

import math

from rlpipe.metrics import window_mean


def test_window_mean_quarters_and_missing_values():
    records = [{"step": i, "x": float(i)} for i in range(1, 9)] + [{"step": 9}]  # 9 records: quarters of 2
    value = lambda r: r.get("x")  # noqa: E731
    assert window_mean(records, value, first=True) == 1.5
    assert window_mean(records, value, first=False) == 8.0  # the last record has no "x": skipped, not 0
    assert window_mean(records, lambda r: r.get("x", 0.0), first=False) == 4.0
    assert math.isnan(window_mean([{"step": 1}], value, first=True))
