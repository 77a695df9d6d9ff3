"""Tinker's protobuf bodies <-> rlpipe's types (the JSON ones are in bodies.py).

The message classes are the SDK's own (`tinker.proto.tinker_public_pb2`), so the server
and the client cannot disagree on the schema. Every decode error is a UserError naming the
field, never a crash.
"""

from __future__ import annotations

import math

import numpy as np
from google.protobuf.message import DecodeError
from tinker.proto import tinker_public_pb2 as pb

from rlpipe.serve.futures import UserError
from rlpipe.types import (
    Datum,
    EncodedTextChunk,
    ForwardBackwardOutput,
    ModelInput,
    SampleResponse,
    TensorData,
)

_NUMPY = {pb.DTYPE_FLOAT32: np.float32, pb.DTYPE_INT64: np.int64, pb.DTYPE_INT32: np.int32}


def _array(raw: bytes, dtype, what: str) -> np.ndarray:
    size = np.dtype(dtype).itemsize
    if len(raw) % size:
        raise UserError(f"{what}: {len(raw)} bytes is not a whole number of {np.dtype(dtype).name} values")
    return np.frombuffer(raw, dtype=dtype)


def tensor_to_numpy(t: pb.Tensor, what: str) -> np.ndarray:
    if t.dtype not in _NUMPY:
        raise UserError(f"{what}: unsupported dtype {pb.DType.Name(t.dtype) if t.dtype in pb.DType.values() else t.dtype}")
    dtype = _NUMPY[t.dtype]
    shape = tuple(int(s) for s in t.shape)
    if any(s < 0 for s in shape):
        raise UserError(f"{what}: negative shape {shape}")
    if t.WhichOneof("encoding") == "sparse_csr":
        if len(shape) != 2:
            raise UserError(f"{what}: a sparse CSR tensor must be 2-D, shape is {shape}")
        values = _array(t.sparse_csr.values, dtype, what)
        crow = _array(t.sparse_csr.crow_indices, np.int64, what)
        cols = _array(t.sparse_csr.col_indices, np.int64, what)
        if len(crow) != shape[0] + 1 or len(cols) != len(values) or (len(cols) and (cols.min() < 0 or cols.max() >= shape[1])) \
                or (crow[0] != 0 or crow[-1] != len(values) or np.any(np.diff(crow) < 0)):
            raise UserError(f"{what}: inconsistent sparse CSR indices")
        out = np.zeros(shape, dtype=dtype)
        rows = np.repeat(np.arange(shape[0]), np.diff(crow))
        out[rows, cols] = values
        return out
    flat = _array(t.dense, dtype, what)
    if not shape:
        shape = (len(flat),)
    if math.prod(shape) != len(flat):
        raise UserError(f"{what}: shape {list(shape)} needs {math.prod(shape)} values, got {len(flat)}")
    return flat.reshape(shape)


def model_input_from_chunks(chunks, what: str = "model_input") -> ModelInput:
    out = []
    for i, chunk in enumerate(chunks):
        kind = chunk.WhichOneof("chunk")
        if kind != "encoded_text":
            raise UserError(f"{what} chunk {i} is {kind or 'empty'}: rlpipe serves text models only (encoded_text chunks)")
        out.append(EncodedTextChunk(tokens=_array(chunk.encoded_text.tokens, np.int32, what).tolist()))
    return ModelInput(chunks=out)


def decode_forward_backward(body: bytes) -> tuple[pb.ForwardBackwardRequest, list[Datum], dict]:
    """The request message, its datums and its loss_fn_config (v2 preferred)."""
    request = pb.ForwardBackwardRequest()
    try:
        request.ParseFromString(body)
    except (DecodeError, ValueError) as e:
        raise UserError(f"malformed ForwardBackwardRequest protobuf: {e}") from None
    data = []
    for i, d in enumerate(request.data):
        inputs = {}
        for name, tensor in d.loss_fn_inputs.items():
            if len(tensor.shape) > 1:  # refused before decoding: a sparse one would be allocated dense
                raise UserError(f"datum {i} loss_fn_inputs[{name!r}] has shape {list(tensor.shape)}: rlpipe takes 1-D inputs")
            array = tensor_to_numpy(tensor, f"datum {i} loss_fn_inputs[{name!r}]")
            if array.ndim != 1:
                raise UserError(f"datum {i} loss_fn_inputs[{name!r}] has shape {list(array.shape)}: rlpipe takes 1-D inputs")
            inputs[name] = TensorData(data=array.tolist(), dtype="int64" if array.dtype.kind == "i" else "float32")
        data.append(Datum(model_input=model_input_from_chunks(d.model_input, f"datum {i} model_input"), loss_fn_inputs=inputs))
    config: dict = {}
    if request.loss_fn_config_v2:
        for key, value in request.loss_fn_config_v2.items():
            config[key] = value.number if value.WhichOneof("value") == "number" else value.text
    else:
        config = dict(request.loss_fn_config)
    return request, data, config


def loss_spans(request: pb.ForwardBackwardRequest) -> list[list[tuple[str, str, int, int]]]:
    """Per datum, its loss_fn_input_spans as (arm, sequence_id, offset, length), arm "sampled"
    or "prompt" (empty: the datum has no provenance)."""
    out = []
    for i, d in enumerate(request.data):
        spans = []
        for span in d.loss_fn_input_spans:
            arm = span.WhichOneof("span")
            if arm is None:
                raise UserError(f"datum {i}: an empty provenance span")
            run = getattr(span, arm)
            if run.offset < 0 or run.length < 0 or not run.sequence_id:
                raise UserError(f"datum {i}: a provenance span needs a sequence_id and offset, length >= 0")
            spans.append(("sampled" if arm == "sampled_tokens" else "prompt", run.sequence_id, run.offset, run.length))
        out.append(spans)
    return out


def encode_forward_backward(out: ForwardBackwardOutput) -> bytes:
    msg = pb.ForwardBackwardOutput(loss_fn_output_type="ArrayRecord")
    record = msg.loss_fn_outputs.add(type_tag="ArrayRecord", num_datums=len(out.loss_fn_outputs))
    names = out.loss_fn_outputs[0].keys() if out.loss_fn_outputs else ["logprobs"]
    for name in names:
        arrays = [np.asarray(o[name].to_numpy(), dtype=np.float32) for o in out.loss_fn_outputs]
        field = record.fields[name]
        field.dtype = pb.DTYPE_FLOAT32
        field.offsets = np.cumsum([0] + [a.nbytes for a in arrays]).astype(np.int64).tobytes()
        field.data = b"".join(a.tobytes() for a in arrays)
    for key, value in out.metrics.items():
        msg.metrics[key] = float(value)
    return msg.SerializeToString()


def encode_sample(response: SampleResponse, prompt_logprobs_last_n: int | None = None) -> bytes:
    """prompt_logprobs_last_n: only the last n prompt logprobs are given, the others NaN (as Tinker)."""
    msg = pb.SampleResponse()
    for seq in response.sequences:
        msg.sequences.add(
            stop_reason=pb.STOP_REASON_STOP if seq.stop_reason == "stop" else pb.STOP_REASON_LENGTH,
            tokens=np.asarray(seq.tokens, dtype=np.int32).tobytes(),
            logprobs=np.asarray(seq.logprobs or [], dtype=np.float32).tobytes(),
        )
    if response.prompt_logprobs is not None:
        values = [math.nan if v is None else v for v in response.prompt_logprobs]
        if prompt_logprobs_last_n is not None:
            keep_from = len(values) - prompt_logprobs_last_n
            values = [math.nan if i < keep_from else v for i, v in enumerate(values)]
        msg.prompt_logprobs = np.asarray(values, dtype=np.float32).tobytes()
    return msg.SerializeToString()
