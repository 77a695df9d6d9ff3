"""Learning assertions: effects of training (a loss falls, a reward rises) whose size depends
on the seed and on the processor's float rounding, unlike the exact checks elsewhere.

Every such check goes through holds(), which also records the measured value and its bound to
the JSONL file named by $RLPIPE_MARGINS when that is set. benchmarks/learning_margins.py runs
the tests marked `learning` over seeds (RLPIPE_TEST_SEED), torch thread counts
(RLPIPE_TEST_THREADS) and CPU kernel sets (ATEN_CPU_CAPABILITY=avx2 stands in for a processor
without AVX-512: it moves the results as another machine does), and prints each check's margin
against its spread: a bound is set well inside the worst case it measured.
"""

from __future__ import annotations

import json
import operator
import os

SEED = int(os.environ.get("RLPIPE_TEST_SEED", "0"))
"""The seed a learning test varies (its LoRA init, data order, sampling): 0 unless the margins
benchmark asks for another."""
THREADS = int(os.environ.get("RLPIPE_TEST_THREADS", "0"))
"""torch's thread count for every test (conftest.py sets it; 0: torch's default)."""

OPS = {">": operator.gt, "<": operator.lt}


def holds(value: float, op: str, bound: float, what: str) -> None:
    """assert value op bound, recorded (see above). what: the quantity, as the test computes it."""
    if (path := os.environ.get("RLPIPE_MARGINS")):
        import torch

        record = {"test": os.environ.get("PYTEST_CURRENT_TEST", "?").split(" ")[0], "what": what,
                  "value": float(value), "op": op, "bound": float(bound), "seed": SEED,
                  "threads": THREADS or torch.get_num_threads(), "isa": torch.backends.cpu.get_cpu_capability()}
        with open(path, "a") as f:
            f.write(json.dumps(record) + "\n")
    assert OPS[op](value, bound), f"{what} = {value:.4g}, expected {op} {bound:.4g}"
