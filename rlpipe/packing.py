"""Checking Datums and packing variable-length ones into few rows.

Padding every datum to the longest one wastes compute on pad tokens; instead datums are
packed end to end into rows (first-fit decreasing) and a block-diagonal causal mask keeps
them from attending to each other, with positions restarting at 0 for each datum. The
result is the same as running datum by datum (tested).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch

from rlpipe.types import Datum


class Row(NamedTuple):
    datums: list[int]
    """Indices into the data list, in the order they sit in the row."""
    offsets: list[int]


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


def plan_rows(lengths: list[int], max_row_tokens: int, pack: bool) -> list[Row]:
    """First-fit decreasing bin packing; a datum longer than max_row_tokens gets its own row."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    if not pack:
        return [Row([i], [0]) for i in order]
    rows: list[Row] = []
    used: list[int] = []
    for i in order:
        for r, fill in enumerate(used):
            if fill + lengths[i] <= max_row_tokens:
                rows[r].datums.append(i)
                rows[r].offsets.append(fill)
                used[r] += lengths[i]
                break
        else:
            rows.append(Row([i], [0]))
            used.append(lengths[i])
    return rows


class Batch(NamedTuple):
    input_ids: torch.Tensor
    position_ids: torch.Tensor
    attention_mask: torch.Tensor
    """(rows, 1, width, width) boolean: causal within each datum, pads see only themselves."""


def build_batch(token_lists: list[list[int]], rows: list[Row], pad_id: int, device) -> Batch:
    width = max(row.offsets[-1] + len(token_lists[row.datums[-1]]) for row in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    position_ids = torch.zeros((len(rows), width), dtype=torch.long)
    # Pad positions get their own segment id (-1 - position), so each attends only to itself
    # and no attention row is fully masked (which would give NaN in sdpa).
    segment = -1 - torch.arange(width).repeat(len(rows), 1)
    for r, row in enumerate(rows):
        for seg, (i, off) in enumerate(zip(row.datums, row.offsets)):
            n = len(token_lists[i])
            input_ids[r, off : off + n] = torch.tensor(token_lists[i])
            position_ids[r, off : off + n] = torch.arange(n)
            segment[r, off : off + n] = seg
    causal = torch.tril(torch.ones(width, width, dtype=torch.bool))
    mask = causal & (segment[:, :, None] == segment[:, None, :])
    return Batch(input_ids.to(device), position_ids.to(device), mask[:, None].to(device))


def unpack(values_RW: torch.Tensor, rows: list[Row], lengths: list[int]) -> list[torch.Tensor]:
    """Per-datum slices of a (rows, width) tensor, in the original datum order."""
    out: list[torch.Tensor | None] = [None] * len(lengths)
    for r, row in enumerate(rows):
        for i, off in zip(row.datums, row.offsets):
            out[i] = values_RW[r, off : off + lengths[i]]
    return out  # type: ignore[return-value]
