"""What a run config is refused for, beyond the bounds on its fields, and how load() says it.

A single field's bound is a msgspec.Meta on the field (rlpipe/pipeline/config.py), refused while
decoding; explain() words msgspec's message as "learner.steps must be >= 1, got 0". check()
keeps the rules that relate several fields, or look inside a table (loss_fn_config,
engine_args). Keys that moved get an error naming their new place (refuse_moved).
"""

from __future__ import annotations

import logging
import re
import sys
import typing
from typing import Annotated, Any, Literal

import msgspec

from rlpipe.pipeline.config import EngineConfig, RunConfig
from rlpipe.sampling.vllm_args import ENGINE_ARGS_SET_BY_RLPIPE, VLLM_LORA_RANKS

log = logging.getLogger(__name__)

MOVED = {f"explorer.{name}": f"explorer.engine.{name}" for name in EngineConfig.__struct_fields__}
"""Old key -> its new place: the sampling engine's settings have their own table, [explorer.engine]."""
SECRETS = ("tinker_api_key",)
"""Fields whose refused value an error message must not repeat."""


def check(config: RunConfig) -> RunConfig:
    learner, explorer, engine = config.learner, config.explorer, config.explorer.engine
    if config.max_staleness < learner.sync_interval - 1:
        # Weights only move every sync_interval steps; a tighter bound would stall the explorer.
        raise ValueError(
            f"max_staleness ({config.max_staleness}) must be >= learner.sync_interval - 1 "
            f"({learner.sync_interval - 1}), or the explorer waits for weights that never come"
        )
    # The learner's algorithm settings (kl_coef, learning-rate schedule, optimizer steps per batch).
    if "kl_coef" in learner.loss_fn_config:
        raise ValueError("set the KL penalty with learner.kl_coef, not learner.loss_fn_config.kl_coef: the learner "
                         "also sets the per-token weights that make it a per-token mean")
    if learner.lr_warmup_steps > learner.steps:
        raise ValueError(f"learner.lr_warmup_steps must be in [0, learner.steps = {learner.steps}], got {learner.lr_warmup_steps}")
    if learner.optim_steps_per_batch > config.groups_per_batch:
        raise ValueError(f"learner.optim_steps_per_batch must be in [1, groups_per_batch = {config.groups_per_batch}] "
                         f"(mini-batches are made of whole groups), got {learner.optim_steps_per_batch}")
    # Placement: devices for each learner process and each explorer.
    if "," in learner.device and len(learner.device.split(",")) != learner.processes:
        raise ValueError(f"learner.device {learner.device!r} names {len(learner.device.split(','))} GPUs: "
                         f"give one per learner process (learner.processes = {learner.processes})")
    if explorer.devices and len(explorer.devices) != explorer.count:
        raise ValueError(f"explorer.devices names {len(explorer.devices)} devices for explorer.count = "
                         f"{explorer.count} explorers: give one per explorer (or none)")
    if learner.processes > 1 and learner.dist_timeout_s <= learner.batch_timeout_s:
        raise ValueError(f"learner.dist_timeout_s ({learner.dist_timeout_s}) must exceed learner.batch_timeout_s "
                         f"({learner.batch_timeout_s}): the other ranks wait while rank 0 fetches a batch")
    check_tinker(config)
    check_weight_updates(config)
    # The sampling engine's settings (vllm itself is not imported here).
    gpus = engine.device.partition(":")[2]
    if gpus and len(gpus.split(",")) < engine.tensor_parallel_size:
        raise ValueError(f"explorer.engine.tensor_parallel_size {engine.tensor_parallel_size} needs as many GPUs; "
                         f"explorer.engine.device {engine.device!r} names {len(gpus.split(','))}")
    if explorer.sampler in ("auto", "vllm") and not engine.max_lora_rank and learner.rank > VLLM_LORA_RANKS[-1]:
        raise ValueError(f"learner.rank {learner.rank} is above the largest LoRA rank vLLM serves ({VLLM_LORA_RANKS[-1]})")
    for name in engine.engine_args:
        if name in ENGINE_ARGS_SET_BY_RLPIPE:
            instead = ENGINE_ARGS_SET_BY_RLPIPE[name]
            raise ValueError(f"explorer.engine.engine_args must not set {name!r}: "
                             + (f"use {instead} instead" if instead else "rlpipe sets it itself"))
    return config


def check_weight_updates(config: RunConfig) -> None:
    """In-flight weight updates need the vLLM sampler or a Tinker endpoint (whose in-flight
    sampling clients take each save at the next request, docs/tinker.md): the local sampler
    refuses them (its reason, rlpipe.sampling.local_backend.INFLIGHT_REFUSED)."""
    explorer = config.explorer
    if explorer.weight_updates != "inflight":
        return
    from rlpipe.sampling import resolve_backend

    sampler = resolve_backend(explorer.sampler)
    if sampler == "local":
        how = "auto picks the local sampler here: vLLM is not installed" if explorer.sampler == "auto" else "local"
        raise ValueError(f'explorer.weight_updates = "inflight" needs the vLLM sampler; explorer.sampler is {how}. '
                         'The local sampler finishes every request on the version it started with: use '
                         'explorer.weight_updates = "between_requests" with it')


def check_tinker(config: RunConfig) -> None:
    """learner.backend and explorer.sampler "tinker" go together: the explorers sample the
    sampler paths that only a learner on a Tinker endpoint publishes, and that learner
    publishes no adapter bytes for a local engine to load."""
    learner, sampler = config.learner, config.explorer.sampler
    if sampler == "tinker" and learner.backend != "tinker":
        raise ValueError(
            f'explorer.sampler = "tinker" needs learner.backend = "tinker" (got {learner.backend!r}): the explorers '
            "sample the tinker:// sampler weights that a learner training on the Tinker endpoint publishes; a local "
            'learner publishes adapter bytes, which only explorer.sampler = "vllm", "local" or "auto" load')
    if learner.backend == "tinker" and sampler != "tinker":
        raise ValueError(
            f'learner.backend = "tinker" needs explorer.sampler = "tinker" (got {sampler!r}): that learner publishes '
            "tinker:// sampler paths on the endpoint, not adapter bytes a local engine could load")
    if learner.backend != "tinker":
        return
    if learner.processes != 1:
        raise ValueError('learner.processes > 1 needs learner.backend = "local": with "tinker" the endpoint trains')
    # The Tinker API's losses know no KL term; several optimizer steps per batch are built and
    # tested on the local client only.
    if learner.kl_coef > 0:
        raise ValueError('learner.kl_coef > 0 needs learner.backend = "local": the Tinker API\'s losses have no '
                         "KL penalty against the base model")
    if learner.optim_steps_per_batch != 1:
        raise ValueError('learner.optim_steps_per_batch > 1 needs learner.backend = "local"; with "tinker" it must be 1')


def refuse_moved(raw: dict, overrides: dict[str, Any], path: str) -> None:
    """A ValueError naming the new place of an old key, in the file or in the overrides (--set)."""
    explorer = raw.get("explorer")
    for old, new in MOVED.items():
        name = old.rpartition(".")[2]
        if isinstance(explorer, dict) and name in explorer:
            raise ValueError(f"{path}: explorer.{name} moved to [explorer.engine] {name}: the sampling engine's "
                             "settings have their own table")
        if old in overrides:
            raise ValueError(f"--set {old} moved to --set {new}: the sampling engine's settings have their own "
                             "table, [explorer.engine]")


def move_old_keys(raw: dict, path: str) -> None:
    """A run's record (its config.json) from before [explorer.engine]: its engine keys moved
    there, so that the run can still be exported and inspected."""
    explorer = raw.get("explorer")
    old = [name for name in EngineConfig.__struct_fields__ if isinstance(explorer, dict) and name in explorer]
    if old:
        engine = explorer.setdefault("engine", {})
        for name in old:
            engine[name] = explorer.pop(name)
        log.info("%s: read explorer.%s as explorer.engine.*, where they moved", path, ", ".join(old))


def explain(message: str, raw: dict) -> str:
    """msgspec's "Expected `int` >= 1 - at `$.learner.steps`" as "learner.steps must be >= 1,
    got 0", followed by the Meta's description (why the bound is there); for a pattern the
    description is what the value must be ("tinker_base_url must be an http:// ... URL").
    An enum's as "learner.backend must be one of ('local', 'tinker'), got 'remote'". Any
    other message (a wrong type, an unknown field) as msgspec says it."""
    what, sep, where = message.rpartition(" - at `$.")
    if not sep:
        return message
    key = where.removesuffix("`")
    hint = _hint(key)
    metas = [m for m in typing.get_args(hint)[1:] if isinstance(m, msgspec.Meta)] if typing.get_origin(hint) is Annotated else []
    why = ""
    if what.startswith("Invalid enum value") and typing.get_origin(hint) is Literal:
        bound = f"be one of {typing.get_args(hint)}"
    elif what.startswith("Expected `") and ", got" not in what and metas:
        bound, why = _bound(metas[0])
    else:
        return message
    value = _value(raw, key)
    got = "" if key in SECRETS or value is _MISSING else f", got {value!r}"
    return f"{key} must {bound}{got}{why}"


def _bound(meta: msgspec.Meta) -> tuple[str, str]:
    """("be in (0, 2]", ": why") for a Meta; for a pattern ("be " + its description, "")."""
    if meta.pattern is not None:
        return f"be {meta.description}" if meta.description else f"match {meta.pattern!r}", ""
    finite = meta.le == sys.float_info.max  # what msgspec can say of "finite" (its bounds must be finite)
    low = f"[{meta.ge}" if meta.ge is not None else f"({meta.gt}" if meta.gt is not None else ""
    high = "" if finite else f"{meta.le}]" if meta.le is not None else f"{meta.lt})" if meta.lt is not None else ""
    if meta.ge is not None and meta.ge == meta.le:
        text = f"{meta.ge}"
    elif low and high:
        text = f"in {low}, {high}"
    elif low:
        text = (">= " if low[0] == "[" else "> ") + low[1:]
    else:
        text = ("<= " if high[-1] == "]" else "< ") + high[:-1]
    why = f": {meta.description}" if meta.description else ""
    return f"be {'finite and ' if finite else ''}{text}", why


def _steps(key: str) -> list[str | int]:
    """"explorer.devices[1]" -> ["explorer", "devices", 1]."""
    return [int(index) if index else name for name, index in re.findall(r"(\w+)|\[(\d+)\]", key)]


def _hint(key: str) -> Any:
    """The annotation (with its Meta) of the field at a msgspec path."""
    node: Any = RunConfig
    for step in _steps(key):
        if isinstance(step, int):  # an item of a list
            items = typing.get_args(typing.get_args(node)[0] if typing.get_origin(node) is Annotated else node)
            node = items[0] if items else None
        elif isinstance(node, type) and issubclass(node, msgspec.Struct):
            node = typing.get_type_hints(node, include_extras=True).get(step)
        else:
            return None
    return node


_MISSING = object()


def _value(raw: Any, key: str) -> Any:
    """The value at a msgspec path in the decoded TOML, _MISSING where it is not there."""
    for step in _steps(key):
        if isinstance(step, int) and isinstance(raw, list) and step < len(raw) or isinstance(raw, dict) and step in raw:
            raw = raw[step]
        else:
            return _MISSING
    return raw
