"""Turning token sequences into Datums: the one place where inputs get shifted."""

from __future__ import annotations

import numpy as np

from rlpipe.types import Datum, ModelInput


def datum_from_tokens_weights(tokens: list[int], weights: list[float] | np.ndarray) -> Datum:
    """A cross-entropy Datum: predict tokens[1:] from tokens[:-1]; weights[i] is the
    weight of predicting tokens[i] (so weights[0], the first token, is never trained)."""
    weights = np.asarray(weights, dtype=np.float32)
    if len(tokens) < 2 or len(weights) != len(tokens):
        raise ValueError(f"need >= 2 tokens and one weight per token, got {len(tokens)} tokens, {len(weights)} weights")
    return Datum(
        model_input=ModelInput.from_ints(tokens[:-1]),
        loss_fn_inputs={"target_tokens": np.asarray(tokens[1:], dtype=np.int64), "weights": weights[1:]},
    )


def supervised_datum(prompt: list[int], completion: list[int]) -> Datum:
    """Train on the completion only."""
    return datum_from_tokens_weights(prompt + completion, [0.0] * len(prompt) + [1.0] * len(completion))
