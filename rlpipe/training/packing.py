"""Checking Datums and laying them out for the learner's forward pass.

A batch is cut into micro-batches of at most `max_tokens` tensor tokens (pads included):
gradients accumulate across them, so peak memory follows the budget, not the batch. Each
micro-batch is laid out in one of three ways:

- "rows": datums packed end to end (first-fit decreasing) into rows of one width, the larger
  of `row_tokens` and the longest datum. Attention over a row costs width², so a bounded
  width keeps it near the datums' own sum of length² while packing keeps pads few.
- "padded": one datum per row, padded to the longest in the micro-batch. Datums are taken
  longest first, so each micro-batch holds similar lengths.
- "varlen": the micro-batch's datums end to end in a single row, no pads; attention runs per
  datum through cumulative sequence lengths (rlpipe.training.attention).

Positions restart at 0 for each datum and pads sit at position 0, so transformers' own mask
code sees packed sequences (it builds the block-diagonal causal mask, sliding windows
included, per layer type) and no token attends across datums. The result equals running
datum by datum (tests/test_packing.py, in float64).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch

from rlpipe.types import Datum

LAYOUTS = ("rows", "padded", "varlen")


class Row(NamedTuple):
    datums: list[int]
    """Indices into the data list, in the order they sit in the row."""
    offsets: list[int]


class MicroBatch(NamedTuple):
    rows: list[Row]
    width: int

    @property
    def datums(self) -> list[int]:
        """Datum indices in the order their tokens come out of flat_positions()."""
        return [i for row in self.rows for i in row.datums]

    @property
    def tensor_tokens(self) -> int:
        return len(self.rows) * self.width


def check_data(data: list[Datum], vocab_size: int, required: tuple[str, ...]) -> None:
    """Raise a ValueError naming the datum and the problem; nothing reaches the model otherwise."""
    if not data:
        raise ValueError("no data: pass at least one Datum")
    for i, datum in enumerate(data):
        if not isinstance(datum, Datum):
            raise TypeError(f"datum {i} is a {type(datum).__name__}, not a types.Datum")
        tokens = np.asarray(datum.model_input.to_ints(), dtype=np.int64)
        n = len(tokens)
        if n == 0:
            raise ValueError(f"datum {i}: model_input is empty")
        check_ids(tokens, vocab_size, f"datum {i}: model_input")
        for name in required:
            if name not in datum.loss_fn_inputs:
                raise ValueError(f"datum {i}: missing loss input {name!r}")
        if datum.loss_fn_inputs.keys() != data[0].loss_fn_inputs.keys():
            raise ValueError(
                f"datum {i} has loss inputs {sorted(datum.loss_fn_inputs)} but datum 0 has "
                f"{sorted(data[0].loss_fn_inputs)}: all datums of one call need the same inputs"
            )
        for name, tensor in datum.loss_fn_inputs.items():
            array = tensor.to_numpy()
            if array.ndim != 1 or len(array) != n:
                raise ValueError(
                    f"datum {i}: loss input {name!r} has shape {tuple(array.shape)} but model_input "
                    f"has {n} tokens (inputs are per token, already shifted)"
                )
        if "target_tokens" in datum.loss_fn_inputs:
            check_ids(datum.loss_fn_inputs["target_tokens"].to_numpy(), vocab_size, f"datum {i}: target_tokens")


def check_ids(ids: np.ndarray, vocab_size: int, where: str) -> None:
    if ids.dtype.kind == "f" and not np.all(np.mod(ids, 1) == 0):
        raise ValueError(f"{where} holds non-integer token ids")
    bad = (ids < 0) | (ids >= vocab_size)
    if bad.any():
        raise ValueError(
            f"{where} has token id {int(ids[bad][0])} outside the vocabulary [0, {vocab_size})"
        )


def plan(lengths: list[int], layout: str, *, row_tokens: int = 256, max_tokens: int = 0) -> list[MicroBatch]:
    """Micro-batches of at most max_tokens tensor tokens (0: no limit); a datum longer than
    the budget gets a micro-batch of its own. Datums are placed longest first."""
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; choose one of {LAYOUTS}")
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    budget = max_tokens if max_tokens > 0 else float("inf")
    batches: list[MicroBatch] = []
    rows: list[Row] = []
    fill: list[int] = []
    width = 0
    for i in order:
        n = lengths[i]
        if not rows:
            width = max(row_tokens, n) if layout == "rows" else n
        if layout == "varlen":
            r, cost = 0, (fill[0] if fill else 0) + n
        else:
            r = next((r for r, used in enumerate(fill) if layout == "rows" and used + n <= width), len(rows))
            cost = (len(rows) + (r == len(rows))) * width
        if rows and cost > budget:
            batches.append(MicroBatch(rows, max(fill)))  # only as wide as the fullest row
            rows, fill, width = [], [], (max(row_tokens, n) if layout == "rows" else n)
            r = 0
        if r == len(rows):
            rows.append(Row([], []))
            fill.append(0)
        rows[r].datums.append(i)
        rows[r].offsets.append(fill[r])
        fill[r] += n
    if rows:
        batches.append(MicroBatch(rows, max(fill)))  # only as wide as the fullest row
    return batches


class Inputs(NamedTuple):
    input_ids: torch.Tensor
    """(rows, width) token ids; pads hold pad_id."""
    position_ids: torch.Tensor
    """(rows, width): 0, 1, ... within each datum; 0 on pads."""
    targets: torch.Tensor
    """(N,) the target token of every real position, datum after datum (MicroBatch.datums order)."""
    index: torch.Tensor
    """(N,) where those positions sit in the flattened (rows * width) tensor."""
    cu_seqlens: torch.Tensor | None
    """(datums + 1,) int32 cumulative lengths, for the varlen layout."""
    max_len: int


def build(batch: MicroBatch, tokens: list[np.ndarray], targets: list[np.ndarray], pad_id: int, device,
          varlen: bool) -> Inputs:
    """The model inputs of one micro-batch. tokens/targets: int64 arrays per datum (all datums)."""
    input_ids = np.full((len(batch.rows), batch.width), pad_id, dtype=np.int64)
    position_ids = np.zeros((len(batch.rows), batch.width), dtype=np.int64)
    index, flat_targets, lengths = [], [], []
    for r, row in enumerate(batch.rows):
        for i, off in zip(row.datums, row.offsets):
            n = len(tokens[i])
            input_ids[r, off : off + n] = tokens[i]
            position_ids[r, off : off + n] = np.arange(n)
            index.append(np.arange(n) + r * batch.width + off)
            flat_targets.append(targets[i])
            lengths.append(n)
    cu = None
    if varlen:
        cu = torch.tensor(np.concatenate([[0], np.cumsum(lengths)]), dtype=torch.int32, device=device)
    return Inputs(
        torch.from_numpy(input_ids).to(device), torch.from_numpy(position_ids).to(device),
        torch.from_numpy(np.concatenate(flat_targets)).to(device), torch.from_numpy(np.concatenate(index)).to(device),
        cu, max(lengths),
    )
