"""stable_reinforce's stability info in `rlpipe serve`.

A sampling client made with record_stability_info=True asks the server to record each sequence
it samples; the SDK then names that sequence by its sequence_id (`<request_id>:<i>`) in the
provenance spans of a training datum (Datum.with_provenance). What is recorded is what the
loss needs and the client could get wrong: the sampled tokens, the sampler's logprob of each,
and the version of the weights that sampled them (the model's optimizer step at the save; for
an in-flight client, the version current when the request started).

As Tinker documents it: records belong to the session that sampled them and can be trained on
for one day after sampling, each training request that uses one restarting the day. Memory is
bounded too (MAX_TOKENS): past it the least recently used records go first, and a datum naming
one gets a clear error.
"""

from __future__ import annotations

import collections
import time
from dataclasses import dataclass

import numpy as np

from rlpipe.serve.futures import UserError

KEEP_S = 86400.0
MAX_TOKENS = 20_000_000
"""Recorded tokens kept (about 8 bytes each, so at most ~160 MB)."""


@dataclass
class Record:
    session_id: str | None
    model_id: str | None
    version: int
    """Optimizer steps of model_id when the weights that sampled it were saved; -1: the base model."""
    tokens: np.ndarray
    logprobs: np.ndarray
    touched: float


@dataclass
class Resolved:
    """One datum's targets, resolved through its loss_fn_input_spans."""

    sampling_logprobs: np.ndarray
    sampled: np.ndarray
    """1.0 where the target is a recorded sampled token, 0.0 elsewhere (prompt runs)."""
    records: list[Record]


class StabilityStore:
    def __init__(self, keep_s: float = KEEP_S, max_tokens: int = MAX_TOKENS):
        self.keep_s, self.max_tokens = keep_s, max_tokens
        self.records: collections.OrderedDict[str, Record] = collections.OrderedDict()
        self.tokens = 0

    def record(self, sequence_id: str, session_id: str | None, model_id: str | None, version: int,
               tokens, logprobs) -> None:
        tokens = np.asarray(tokens, dtype=np.int32)
        logprobs = np.asarray(logprobs if logprobs is not None else [], dtype=np.float32)
        if len(logprobs) != len(tokens):
            raise RuntimeError(f"sequence {sequence_id}: the sampler gave {len(logprobs)} logprobs for {len(tokens)} tokens")
        self._drop(sequence_id)
        self.records[sequence_id] = Record(session_id, model_id, version, tokens, logprobs, time.monotonic())
        self.tokens += len(tokens)
        self._expire()

    def get(self, sequence_id: str, session_id: str | None) -> Record:
        self._expire()
        rec = self.records.get(sequence_id)
        if rec is None:
            raise UserError(f"no stability info for sequence {sequence_id!r}: it was not sampled by a client made with "
                            "record_stability_info=True, or more than a day passed since its last use, or the server "
                            "restarted or ran out of room for it")
        if rec.session_id != session_id:
            raise UserError(f"sequence {sequence_id!r} was sampled in another session: provenance works only within "
                            "one session (sample and train in the same ServiceClient)")
        rec.touched = time.monotonic()
        self.records.move_to_end(sequence_id)
        return rec

    def _drop(self, sequence_id: str) -> None:
        old = self.records.pop(sequence_id, None)
        if old is not None:
            self.tokens -= len(old.tokens)

    def _expire(self) -> None:
        cutoff = time.monotonic() - self.keep_s
        while self.records:
            sequence_id, rec = next(iter(self.records.items()))
            if rec.touched >= cutoff and self.tokens <= self.max_tokens:
                break
            self._drop(sequence_id)

    def resolve(self, spans: list[tuple[str, str, int, int]], targets: np.ndarray, advantages: np.ndarray | None,
                session_id: str | None, what: str) -> Resolved:
        """spans: (arm, sequence_id, offset, length) tiling targets, arm "sampled" or "prompt".
        A sampled run must reproduce the recorded tokens; a prompt run carries no advantage
        (stable_reinforce trains sampled tokens only). Prompt runs are not checked against the
        recorded prompt: Tinker's own examples put placeholder targets there."""
        if not spans:
            raise UserError(f"{what}: stable_reinforce needs provenance on every datum (Datum.with_provenance, naming "
                            "the sequences its targets were sampled as, by a client made with record_stability_info=True)")
        n = len(targets)
        if sum(length for *_, length in spans) != n:
            raise UserError(f"{what}: its loss_fn_input_spans cover {sum(s[3] for s in spans)} positions, "
                            f"target_tokens has {n}: the runs must tile it")
        sampling = np.zeros(n, dtype=np.float32)
        sampled = np.zeros(n, dtype=np.float32)
        used: list[Record] = []
        at = 0
        for arm, sequence_id, offset, length in spans:
            rec = self.get(sequence_id, session_id)
            if arm == "sampled":
                if offset + length > len(rec.tokens):
                    raise UserError(f"{what}: span [{offset}, {offset + length}) of sequence {sequence_id!r} runs past "
                                    f"its {len(rec.tokens)} sampled tokens")
                if not np.array_equal(targets[at:at + length], rec.tokens[offset:offset + length]):
                    raise UserError(f"{what}: target_tokens[{at}:{at + length}] are not the tokens sequence "
                                    f"{sequence_id!r} sampled at [{offset}:{offset + length}]")
                sampling[at:at + length] = rec.logprobs[offset:offset + length]
                sampled[at:at + length] = 1.0
                used.append(rec)
            at += length
        if advantages is not None and np.any((advantages != 0) & (sampled == 0)):
            first = int(np.flatnonzero((advantages != 0) & (sampled == 0))[0])
            raise UserError(f"{what}: advantage {advantages[first]} at position {first}, which no sampled span covers: "
                            "stable_reinforce takes nonzero advantages on sampled tokens only")
        return Resolved(sampling, sampled, used)


def prepare(store: StabilityStore, data: list, spans: list, session_id: str | None, step: int):
    """A stable_reinforce batch as the loss takes it: each datum's `logprobs` are the recorded
    sampler logprobs (whatever the client sent), and its weights are 0 where no sampled span
    covers the target. Returns (datums, per-datum recorded logprobs, stability metrics)."""
    from rlpipe.types import Datum, TensorData

    out, recorded, lags, gaps, sequences = [], [], [], [], set()
    for i, (datum, datum_spans) in enumerate(zip(data, spans)):
        inputs = dict(datum.loss_fn_inputs)
        if "target_tokens" not in inputs or "advantages" not in inputs:
            raise UserError(f"datum {i}: stable_reinforce needs loss_fn_inputs target_tokens and advantages")
        targets = inputs["target_tokens"].to_numpy().astype(np.int64)
        advantages = inputs["advantages"].to_numpy()
        res = store.resolve(datum_spans, targets, advantages, session_id, f"datum {i}")
        sent = inputs.get("logprobs")
        if sent is not None and len(sent.to_numpy()) == len(targets) and res.sampled.any():
            gaps.append(float(np.abs(sent.to_numpy() - res.sampling_logprobs)[res.sampled > 0].max()))
        weights = inputs["weights"].to_numpy() if "weights" in inputs else np.ones(len(targets), dtype=np.float32)
        inputs["logprobs"] = TensorData.from_numpy(res.sampling_logprobs)
        inputs["weights"] = TensorData.from_numpy((weights * res.sampled).astype(np.float32))
        out.append(Datum(model_input=datum.model_input, loss_fn_inputs=inputs))
        recorded.append(res.sampling_logprobs)
        for rec in res.records:
            sequences.add(id(rec))
            if rec.version is not None and rec.version >= 0:
                lags.append(step - rec.version)
    metrics = {"stability_sequences:sum": float(len(sequences))}
    if lags:
        metrics |= {"stability_version_lag:mean": float(np.mean(lags)), "stability_version_lag:max": float(max(lags))}
    if gaps:
        metrics["stability_client_logprob_gap:max"] = max(gaps)
    return out, recorded, metrics
