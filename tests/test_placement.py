"""Placement: one run config says which device each explorer and each learner rank uses
(explorer.devices, learner.device with one GPU per rank), checked when the config is read.
The end-to-end run with explorer.devices is in tests/test_multi_explorer.py."""

from __future__ import annotations

import pytest

from rlpipe.pipeline import distributed
from rlpipe.pipeline.config import load
from rlpipe.pipeline.launch import Supervisor


def config_file(tmp_path, *lines: str):
    path = tmp_path / "run.toml"
    path.write_text("\n".join(['name = "run"', f'runs_dir = "{tmp_path}"', *lines]) + "\n")
    return path


def explorer_devices(supervisor: Supervisor) -> dict[str, str | None]:
    """role -> the explorer.engine.device its command sets (the last --set of it wins), None if none."""
    out = {}
    for name, role in supervisor.roles.items():
        sets = [v for k, v in zip(role.command, role.command[1:]) if k == "--set" and v.startswith("explorer.engine.device=")]
        out[name] = sets[-1].partition("=")[2] if sets else None
    return out


def test_each_explorer_gets_its_own_device(tmp_path):
    path = config_file(tmp_path, "[explorer]", "count = 3", 'devices = ["cuda:0", "cuda:1", "cuda:2,3"]')
    config = load(path, {})
    supervisor = Supervisor(config, str(path), ["explorer.engine.device=cpu"], resume=False)
    # The run's own --set explorer.engine.device goes to every role; each explorer's device comes after it.
    assert explorer_devices(supervisor) == {"buffer": "cpu", "learner": "cpu", "explorer-0": '"cuda:0"',
                                            "explorer-1": '"cuda:1"', "explorer-2": '"cuda:2,3"'}
    # Without devices, the run's own --set items alone.
    plain = Supervisor(load(config_file(tmp_path, "[explorer]", "count = 2"), {}), str(path), [], resume=False)
    assert set(explorer_devices(plain).values()) == {None}


@pytest.mark.parametrize("lines, message", [
    (["[explorer]", "count = 3", 'devices = ["cuda:0", "cuda:1"]'], "explorer.devices names 2 devices for explorer.count = 3"),
    (["[learner]", "processes = 2", 'device = "cuda:1,2,3"'], "names 3 GPUs: give one per learner process"),
])
def test_a_layout_that_does_not_add_up_is_refused(tmp_path, lines, message):
    with pytest.raises(ValueError, match=message):
        load(config_file(tmp_path, *lines), {})


def test_each_learner_rank_takes_its_gpu(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert distributed.rank_device("cuda:3,4") == "cuda:4"
    assert distributed.rank_device("cpu") == "cpu"
    monkeypatch.setenv("LOCAL_RANK", "2")
    with pytest.raises(ValueError, match="no GPU for local rank 2"):
        distributed.rank_device("cuda:3,4")
    monkeypatch.delenv("LOCAL_RANK")
    assert distributed.rank_device("cuda:3,4") == "cuda:3"  # not under torchrun: the first


def test_the_documented_layout_is_a_valid_config(tmp_path):
    """The layout docs/scaling.md shows loads, and places the roles as it says."""
    import re
    from pathlib import Path

    page = (Path(__file__).resolve().parents[1] / "docs" / "scaling.md").read_text()
    block = re.search(r"```toml\n(# layout\.toml.*?)```", page, re.DOTALL)
    assert block, "docs/scaling.md has no layout.toml block"
    path = config_file(tmp_path, block.group(1))
    config = load(path, {})
    assert (config.explorer.count, config.learner.processes, config.learner.strategy) == (3, 4, "ddp")
    assert explorer_devices(Supervisor(config, str(path), [], resume=False))["explorer-2"] == '"cuda:2"'
    assert distributed.rank_device(config.learner.device) == "cuda:4"  # rank 0 (not under torchrun)


def test_explorers_on_one_cpu_host_share_its_cores(tmp_path, monkeypatch):
    """With count > 1 on the CPU, each explorer's engine takes a slice of the cores the learner
    leaves, not every core (all of them spinning on 2 cores made a run 15x slower)."""
    import os

    import torch

    from rlpipe.pipeline.explorer_engine import share_cores

    cores = sorted(os.sched_getaffinity(0))
    before = torch.get_num_threads()
    try:
        config = load(config_file(tmp_path, "[explorer]", "count = 3", "[explorer.engine]", 'device = "cpu"'), {})
        seen = []
        for k in range(3):
            monkeypatch.delenv("VLLM_CPU_OMP_THREADS_BIND", raising=False)
            share_cores(config, f"explorer-{k}")
            threads = max(1, len(cores) // 2 // 3)
            assert torch.get_num_threads() == threads
            bind = [int(c) for c in os.environ["VLLM_CPU_OMP_THREADS_BIND"].split(",")]
            assert len(bind) == threads and set(bind) <= set(cores)
            seen.append(bind)
        if len(cores) >= 6:  # enough cores for a slice each: no two explorers on one core
            assert len({c for b in seen for c in b}) == 3 * threads
        # A bind the user set is kept; one explorer keeps the engine's defaults.
        monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "nobind")
        share_cores(config, "explorer-0")
        assert os.environ["VLLM_CPU_OMP_THREADS_BIND"] == "nobind"
        torch.set_num_threads(before)
        share_cores(load(config_file(tmp_path, "[explorer]", "count = 1", "[explorer.engine]", 'device = "cpu"'), {}), "explorer-0")
        assert torch.get_num_threads() == before
    finally:
        torch.set_num_threads(before)
