"""The run config's bounds, checks and moved keys: every single-field bound (a msgspec.Meta on
the field, or a Literal) is refused while the config is read, in one line naming the key and
the bound; the rules relating fields are check()'s; the engine settings, [explorer.engine],
are the engine's options one for one, and their old place in [explorer] is refused naming the
new one."""

from __future__ import annotations

import inspect
import json
import math
import os
import subprocess
import sys
import typing
from pathlib import Path
from typing import Annotated, Literal

import msgspec
import pytest

from rlpipe.cli.main import main
from rlpipe.pipeline.config import EngineConfig, RunConfig, dump, load
from rlpipe.pipeline.config_check import SECRETS
from rlpipe.pipeline.explorer_engine import engine_options, share_cores

REPO = Path(__file__).resolve().parents[1]


def toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} = {toml_value(v)}" for k, v in value.items()) + "}"
    return json.dumps(value)


def config_file(tmp_path, settings: dict) -> Path:
    """A run config setting these dotted keys, each under its table."""
    tables: dict[str, list[str]] = {}
    for key, value in settings.items():
        table, _, name = key.rpartition(".")
        tables.setdefault(table, []).append(f"{name} = {toml_value(value)}")
    lines = [*tables.pop("", []), 'name = "cfg"', f'runs_dir = "{tmp_path}"']
    for table, entries in tables.items():
        lines += [f"[{table}]", *entries]
    path = tmp_path / "run.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def refusal(tmp_path, settings: dict) -> str:
    with pytest.raises(ValueError) as info:
        load(config_file(tmp_path, settings))
    return str(info.value)


# --------------------------------------------------------------------------- single-field bounds

NAN, INF = float("nan"), float("inf")
TODAY = [  # each single-field rule the hand-written check() had, with its bound (key, bad value, bound)
    ("max_staleness", -1, ">= 0"), ("logging.console_every", -1, ">= 0"), ("learner.sync_interval", 0, ">= 1"),
    ("groups_per_batch", 0, ">= 1"), ("explorer.concurrency", 0, ">= 1"),
    ("explorer.count", 0, "in [1, 64]"), ("explorer.count", 65, "in [1, 64]"),
    ("learner.kl_coef", -0.5, "finite and >= 0"), ("learner.kl_coef", NAN, "finite and >= 0"),
    ("learner.kl_coef", INF, "finite and >= 0"), ("learner.lr_warmup_steps", -1, ">= 0"),
    ("learner.lr_min_ratio", 1.5, "in [0, 1]"), ("learner.lr_min_ratio", -0.1, "in [0, 1]"),
    ("learner.optim_steps_per_batch", 0, ">= 1"), ("learner.processes", 0, ">= 1"),
    ("explorer.max_unacked", 0, "in [1, 4096]"), ("explorer.max_unacked", 4097, "in [1, 4096]"),
    ("explorer.max_engine_restarts", -1, ">= 0"), ("explorer.ack_timeout_s", 0, "> 0"),
    ("explorer.engine_start_timeout_s", 0, "> 0"), ("explorer.weight_load_timeout_s", -1, "> 0"),
    ("explorer.first_weights_timeout_s", 0, "> 0"), ("tinker_timeout_s", 0, "> 0"),
    ("tinker_base_url", "127.0.0.1:8000", "an http:// or https:// URL"),
    ("tinker_api_key", "secret", '"" or a key starting with "tml-"'),
    ("explorer.temperature", 0, "in (0, 2]"), ("explorer.temperature", 2.5, "in (0, 2]"),
    ("explorer.top_p", 0.9, "1"), ("explorer.top_k", 40, "0"), ("explorer.top_k", -1, "0"),
    ("explorer.engine.device", "gpu:1", '"", "cpu", "cuda", "cuda:N" or "cuda:N,M,..."'),
    ("explorer.engine.gpu_memory_utilization", 1.5, "in [0, 1]"), ("explorer.engine.max_model_len", -1, ">= 0"),
    ("explorer.engine.tensor_parallel_size", 0, ">= 1"),
    ("explorer.engine.max_lora_rank", 12, "one of (0, 1, 8, 16, 32, 64, 128, 256, 320, 512)"),
    ("buffer.intake_per_round", 0, ">= 1"),
]


@pytest.mark.parametrize("key, value, bound", TODAY, ids=[f"{k}={v}" for k, v, _ in TODAY])
def test_each_bound_of_the_old_check_is_refused_at_load(tmp_path, key, value, bound):
    message = refusal(tmp_path, {key: value})
    got = "" if key in SECRETS else f", got {value!r}"
    assert message.startswith(f"{tmp_path / 'run.toml'}: {key} must be {bound}{got}"), message
    assert "\n" not in message and (key not in SECRETS or "secret" not in message)


def violations(cls=RunConfig, prefix=""):
    """(key, the field's value, the value at key) for each bound of each field, found on the types."""
    for name, hint in typing.get_type_hints(cls, include_extras=True).items():
        key, base = prefix + name, typing.get_args(hint)[0] if typing.get_origin(hint) is Annotated else hint
        if isinstance(base, type) and issubclass(base, msgspec.Struct):
            yield from violations(base, key + ".")
        elif typing.get_origin(base) is list:  # a bound on the items: the first one breaks it
            for item_key, _, bad in violations_of(f"{key}[0]", typing.get_args(base)[0]):
                yield item_key, [bad], bad
        else:
            yield from violations_of(key, hint)


def violations_of(key, hint):
    metas = [m for m in typing.get_args(hint)[1:] if isinstance(m, msgspec.Meta)]
    base = typing.get_args(hint)[0] if typing.get_origin(hint) is Annotated else hint
    if typing.get_origin(base) is Literal:
        choices = typing.get_args(base)
        bad = max(choices) + 1 if isinstance(choices[0], int) else "nope"
        yield key, bad, bad
    for meta in metas:
        step = 1 if base is int else 0.5
        if meta.pattern is not None:
            yield key, "???", "???"
        for bad in (meta.ge - step if meta.ge is not None else None, meta.gt,
                    (INF if meta.le == sys.float_info.max else meta.le + step) if meta.le is not None else None, meta.lt):
            if bad is not None:
                yield key, bad, bad


ALL = list(violations())


@pytest.mark.parametrize("key, field_value, bad", ALL, ids=[f"{k}={b}" for k, _, b in ALL])
def test_every_bound_on_a_field_is_refused_naming_the_key(tmp_path, key, field_value, bad):
    message = refusal(tmp_path, {key.removesuffix("[0]"): field_value})
    got = "" if key.split("[")[0] in SECRETS else f", got {bad!r}"
    assert message.startswith(f"{tmp_path / 'run.toml'}: {key} must be "), message
    assert got in message and "\n" not in message


def test_the_bounds_found_on_the_fields_include_every_old_one():
    found = {key.removesuffix("[0]") for key, _, _ in ALL}
    assert {key for key, _, _ in TODAY} <= found
    assert {"learner.backend", "explorer.sampler", "explorer.engine.dtype", "explorer.devices"} <= found  # Literals, items


# --------------------------------------------------------------------------- rules relating fields


@pytest.mark.parametrize("settings, message", [
    ({"max_staleness": 0, "learner.sync_interval": 3}, r"max_staleness \(0\) must be >= learner.sync_interval - 1 \(2\)"),
    ({"groups_per_batch": 4, "learner.optim_steps_per_batch": 5}, r"optim_steps_per_batch must be in \[1, groups_per_batch = 4\]"),
    ({"learner.steps": 10, "learner.lr_warmup_steps": 11}, r"lr_warmup_steps must be in \[0, learner.steps = 10\]"),
    ({"explorer.count": 2, "explorer.devices": ["cpu"]}, "explorer.devices names 1 devices for explorer.count = 2"),
    ({"explorer.engine.device": "cuda:1", "explorer.engine.tensor_parallel_size": 2},
     r"tensor_parallel_size 2 needs as many GPUs; explorer.engine.device 'cuda:1' names 1"),
    ({"learner.loss_fn_config": {"kl_coef": 0.1}}, "with learner.kl_coef, not learner.loss_fn_config"),
])
def test_rules_relating_fields_are_checked(tmp_path, settings, message):
    import re

    assert re.search(message, refusal(tmp_path, settings))


# --------------------------------------------------------------------------- the moved engine settings

ENGINE_FIELDS = list(EngineConfig.__struct_fields__)
VALUES = dict(device="cuda:0,1", gpu_memory_utilization=0.4, max_model_len=256, tensor_parallel_size=2, cpu_threads=3,
              enforce_eager=False, dtype="bfloat16", max_lora_rank=32, engine_args={"max_num_seqs": 8})


@pytest.mark.parametrize("name", ENGINE_FIELDS)
def test_an_engine_key_in_explorer_names_its_new_table(tmp_path, name):
    message = refusal(tmp_path, {f"explorer.{name}": VALUES[name]})
    assert message == (f"{tmp_path / 'run.toml'}: explorer.{name} moved to [explorer.engine] {name}: the sampling "
                       "engine's settings have their own table")
    moved = load(config_file(tmp_path, {f"explorer.engine.{name}": VALUES[name], "explorer.engine.tensor_parallel_size": 2}))
    assert getattr(moved.explorer.engine, name) == VALUES[name]


@pytest.mark.parametrize("name", ENGINE_FIELDS)
def test_an_engine_key_set_on_the_command_line_names_its_new_place(tmp_path, name):
    path = config_file(tmp_path, {})
    with pytest.raises(SystemExit) as info:
        main(["run", str(path), "--set", f"explorer.{name}={json.dumps(VALUES[name])}"])
    assert str(info.value) == (f"rlpipe: bad config {path}: --set explorer.{name} moved to --set explorer.engine.{name}: "
                               "the sampling engine's settings have their own table, [explorer.engine]")


def test_rlpipe_run_says_a_bad_config_in_one_line(tmp_path):
    path = config_file(tmp_path, {"explorer.device": "cpu"})
    moved = "explorer.device moved to [explorer.engine] device: the sampling engine's settings have their own table"
    for extra, said in (([], moved),
                        (["--set", "explorer.engine.device=cpu", "--set", "explorer.count=0"],
                         "explorer.count must be in [1, 64], got 0")):
        if extra:
            path.write_text(path.read_text().replace('device = "cpu"', "count = 1"))
        out = subprocess.run([sys.executable, "-m", "rlpipe.cli", "run", str(path), *extra], cwd=REPO, timeout=120, check=False,
                             capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        assert out.returncode != 0 and out.stdout == ""
        assert out.stderr.strip() == f"rlpipe: bad config {path}: {said}", out.stderr


def test_a_run_record_from_before_the_engine_table_still_loads(tmp_path):
    """A run's config.json written before [explorer.engine] (rlpipe export, status read it)."""
    config = load(config_file(tmp_path, {f"explorer.engine.{k}": v for k, v in VALUES.items()}))
    record = json.loads(dump(config))
    record["explorer"].update(record["explorer"].pop("engine"))
    path = tmp_path / "config.json"
    path.write_text(json.dumps(record))
    assert load(path).explorer.engine == config.explorer.engine


def test_the_engine_table_maps_one_to_one_onto_the_engine_options(tmp_path):
    from rlpipe.sampling.local_backend import LocalEngine
    from rlpipe.sampling.vllm_args import engine_config

    assert set(VALUES) == set(ENGINE_FIELDS)  # a new engine setting gets a value here
    config = load(config_file(tmp_path, {"max_staleness": 2, **{f"explorer.engine.{k}": v for k, v in VALUES.items()}}))
    options = engine_options(config, "vllm")
    for name, value in VALUES.items():
        if name == "engine_args":  # spread: further vllm.AsyncEngineArgs fields
            assert all(options[k] == v for k, v in value.items())
        elif name != "cpu_threads":  # the explorer process's own threads: test below
            assert options[name] == value, name
    assert set(options) == set(VALUES) - {"cpu_threads", "engine_args"} | {"max_num_seqs", "max_loaded_adapters"}
    assert options["max_loaded_adapters"] == 4  # derived: max_staleness + 2
    takes = inspect.signature(engine_config).parameters  # what VLLMEngine hands its options to
    assert all(name in takes for name in options if name != "max_num_seqs")
    local = engine_options(msgspec.structs.replace(config, explorer=msgspec.structs.replace(
        config.explorer, sampler="local")), "local")
    assert local == {"max_loaded_adapters": 4, "max_model_len": 256, "dtype": "bfloat16", "device": "cuda"}
    assert set(local) <= set(inspect.signature(LocalEngine.__init__).parameters)
    # 0 / "" mean the engine's default; max_lora_rank 0 is learner.rank's
    default = engine_options(load(config_file(tmp_path, {"learner.rank": 12})), "vllm")
    assert (default["max_lora_rank"], default["max_model_len"], default["dtype"]) == (12, 0, "")


def test_engine_cpu_threads_are_the_explorer_process_threads(tmp_path, monkeypatch):
    import torch

    config = load(config_file(tmp_path, {"explorer.engine.device": "cpu", "explorer.engine.cpu_threads": 1}))
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "")
    monkeypatch.delenv("VLLM_CPU_OMP_THREADS_BIND")  # restored (unset) after the test
    before = torch.get_num_threads()
    try:
        share_cores(config, "explorer-0")
        assert torch.get_num_threads() == 1
        assert len(os.environ["VLLM_CPU_OMP_THREADS_BIND"].split(",")) == 1
    finally:
        torch.set_num_threads(before)
