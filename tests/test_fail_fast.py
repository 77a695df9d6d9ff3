"""A role that fails stops the whole run at once, with the role and its error on the console:
real processes through `rlpipe run` (helpers from test_pipeline.py).

Before, an adapter the explorer could not load died in an un-awaited asyncio task, the
explorer kept running without weights, and the run failed only when the learner's batch
timeout (300 s in these configs) expired. The bounds below are far under that, and generous
for a loaded 2-core machine (a run reaches its failure ~15-30 s after launch, engine start
included)."""

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from rlpipe.metrics import read_metrics
from tests.test_pipeline import SAMPLER, assert_no_orphans, rlpipe, run_until_stopped, write_config

pytestmark = pytest.mark.slow  # processes, engines or servers: not in the quick tier (pytest -m "not slow")

pytest.importorskip("vllm", reason="the explorer's engine failures are vLLM's")

STOP_AFTER_FAILURE_S = 20  # from the failing role's error to `rlpipe run` returning
TOTAL_S = 150  # half the 300 s batch timeout that used to end such a run (seen: 79 s at load 10)


def seconds_since_failure(run_dir, role: str) -> float:
    """How long ago the role recorded its error (role.record_failure): run just returned."""
    return time.time() - (run_dir / "logs" / f"{role}.failed").stat().st_mtime


def test_adapter_the_explorer_cannot_load_stops_the_run(tmp_path):
    # A real misconfiguration: the explorer's engine takes adapters up to rank 8, the learner trains rank 16.
    config = write_config(tmp_path, "rank", steps=5, sampler=SAMPLER)
    code, out, took = run_until_stopped(config, "--set", "learner.rank=16", "--set", "explorer.engine.max_lora_rank=8",
                                        "--set", "explorer.engine.max_model_len=512", timeout_s=300)
    run_dir = tmp_path / "rank"
    stopped_after = seconds_since_failure(run_dir, "explorer")
    assert code == 1, out[-3000:]
    assert "role explorer failed: Unrecoverable: " in out  # restarting cannot fix it: not restarted
    assert "cannot load the learner's adapter version 0" in out and "has LoRA rank 16 > the engine's max_lora_rank 8" in out
    assert stopped_after < STOP_AFTER_FAILURE_S and took < TOTAL_S, (stopped_after, took)
    log = (run_dir / "logs" / "explorer.log").read_text()
    assert "max_model_len 512, max_lora_rank 8" in log  # the engine settings reached the running engine
    assert "never retrieved" not in log
    assert not read_metrics(run_dir / "metrics.jsonl")
    assert_no_orphans(run_dir)


def build_head_dim_16_model(path) -> str:
    """A random 1-layer Llama with head_dim 16 (hidden 64 / 4 heads) and the tiny model's tokenizer."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from rlpipe.testing.embedded import default_model_path

    tokenizer = AutoTokenizer.from_pretrained(default_model_path())
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def cpu_vllm() -> bool:
    from vllm.platforms import current_platform

    return current_platform.is_cpu()


@pytest.mark.skipif(not cpu_vllm(), reason="head_dim 16 is refused by vLLM's CPU attention backend only")
def test_engine_that_cannot_start_stops_the_run(tmp_path):
    model = build_head_dim_16_model(tmp_path / "head-dim-16")
    config = write_config(tmp_path, "hd16", steps=5, sampler=SAMPLER)
    code, out, took = run_until_stopped(config, "--set", f"base_model={model}", timeout_s=300)
    stopped_after = seconds_since_failure(tmp_path / "hd16", "explorer")
    assert code == 1, out[-3000:]
    assert f"role explorer failed: Unrecoverable: EngineStartError: vLLM cannot run {model} on CPU: its attention head_dim is 16" in out
    assert stopped_after < STOP_AFTER_FAILURE_S and took < TOTAL_S, (stopped_after, took)
    assert_no_orphans(tmp_path / "hd16")


@pytest.mark.skipif(not cpu_vllm(), reason="uses a model vLLM's CPU backend cannot run")
def test_engine_failing_its_first_request_is_a_start_error(tmp_path, monkeypatch):
    """Without rlpipe's head_dim check the engine starts, and dies on its first request (in
    the worker, on CPU): the engine's start request finds that out, and says which model."""
    from rlpipe.sampling import EngineStartError, vllm_args
    from rlpipe.sampling.vllm_backend import VLLMEngine

    model = build_head_dim_16_model(tmp_path / "head-dim-16")
    monkeypatch.setattr(vllm_args, "check_model_on_platform", lambda *args, **kwargs: None)
    others = set(engine_processes())  # engines other tests of this session started
    with pytest.raises(EngineStartError, match=f"vLLM could not start an engine for {model}: EngineDeadError"):
        VLLMEngine(model, max_loaded_adapters=1, max_lora_rank=8, startup_timeout_s=300)
    deadline = time.monotonic() + 10
    while set(engine_processes()) - others and time.monotonic() < deadline:  # gone, not leaked
        time.sleep(0.2)
    assert not set(engine_processes()) - others


def engine_processes() -> list[int]:
    """Live vLLM engine-core processes started by this one (vLLM names them in their cmdline)."""
    out = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                fields = Path(f"/proc/{entry.name}/stat").read_text().rsplit(")", 1)[1].split()
                cmdline = Path(f"/proc/{entry.name}/cmdline").read_bytes()
            except OSError:
                continue  # gone while we looked
            if int(fields[1]) == os.getpid() and fields[0] != "Z" and b"EngineCore" in cmdline:
                out.append(int(entry.name))
    return out


def test_engine_dying_mid_run_stops_the_run(tmp_path):
    """A dead engine is restarted in place (tests/test_explorer_delivery.py) and a dead
    explorer by the supervisor (tests/test_chaos.py); with neither allowed, the run stops."""
    config = write_config(tmp_path, "dies", steps=200, sampler=SAMPLER)
    run_dir = tmp_path / "dies"
    start = time.monotonic()
    proc = rlpipe("run", config, "--set", "explorer.max_engine_restarts=0", "--set", "supervision.max_restarts=0",
                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        while not read_metrics(run_dir / "metrics.jsonl"):
            assert proc.poll() is None and time.monotonic() - start < 300, "the run ended or stalled early"
            time.sleep(0.5)
        explorer = __import__("json").loads((run_dir / "pids.json").read_text())["explorer"]
        from rlpipe.pipeline.launch import group_members

        members = {pid: Path(f"/proc/{pid}/cmdline").read_bytes() for pid in group_members(explorer)}
        engine = [pid for pid, cmdline in members.items() if b"EngineCore" in cmdline]  # vLLM names its processes
        assert engine, f"no vLLM engine core among the explorer's processes: {members}"
        for pid in engine:
            os.kill(pid, signal.SIGKILL)
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:  # SIGINT: the launcher stops every role's process group
            os.killpg(proc.pid, signal.SIGINT)
            proc.communicate(timeout=60)
    out = out.decode()
    assert proc.returncode == 1, out[-3000:]
    assert "role explorer failed: EngineDeadError: " in out
    assert seconds_since_failure(run_dir, "explorer") < STOP_AFTER_FAILURE_S
    assert len(read_metrics(run_dir / "metrics.jsonl")) < 200
    assert_no_orphans(run_dir)


def test_a_dataset_factory_that_cannot_load_stops_the_run_with_its_name(tmp_path):
    # A typo in dataset.factory: before, the workers' shared generator died with the real error
    # and the run failed with "coroutine raised StopIteration", restarted max_restarts times.
    config = write_config(tmp_path, "factory", steps=3, sampler="local", factory="envs.toy:NoSuchDataset")
    code, out, took = run_until_stopped(config, timeout_s=300)
    assert code == 1, out[-3000:]
    assert "role explorer failed: Unrecoverable: dataset.factory 'envs.toy:NoSuchDataset' failed: ValueError: " \
           "cannot load 'envs.toy:NoSuchDataset'" in out, out[-3000:]
    assert "StopIteration" not in out and "restart 1/" not in out
    assert took < TOTAL_S, took
    assert_no_orphans(tmp_path / "factory")
