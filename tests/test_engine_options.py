"""The explorer's sampling and engine settings: config checks (no vLLM needed), the vLLM
config they turn into (built, no engine started), LoRA rank rounding, the CPU head_dim
check, and a rank-12 adapter on the session's shared engine (rank not one vLLM accepts)."""

import json
import logging

import pytest

from rlpipe.pipeline.config import load
from rlpipe.pipeline.explorer_engine import engine_options, use_device
from rlpipe.sampling.vllm_args import CPU_KV_CACHE_CAP, MiB, lora_rank_for


def config(tmp_path, **overrides):
    path = tmp_path / "run.toml"
    path.write_text('name = "options"\n')
    return load(path, overrides)


# --------------------------------------------------------------------------- config checks


def test_rl_refuses_greedy_and_truncated_sampling(tmp_path):
    assert config(tmp_path).explorer.temperature == 1.0  # the defaults pass
    with pytest.raises(ValueError, match=r"explorer.temperature must be in \(0, 2\], got 0.*greedy"):
        config(tmp_path, **{"explorer.temperature": 0})
    for key, value, bound in (("top_p", 0.9, 1), ("top_k", 40, 0), ("top_k", -1, 0)):
        with pytest.raises(ValueError, match=rf"explorer.{key} must be {bound}, got {value}: RL samples the full "
                                             r"softmax: the learner scores each sampled token under it.*bias"):
            config(tmp_path, **{f"explorer.{key}": value})


def test_engine_settings_are_checked(tmp_path):
    ok = config(tmp_path, **{"explorer.engine.device": "cuda:0,1", "explorer.engine.tensor_parallel_size": 2,
                             "explorer.engine.max_lora_rank": 32, "explorer.engine.engine_args": {"max_num_seqs": 64}})
    assert ok.explorer.engine.engine_args == {"max_num_seqs": 64}
    bad = {
        "explorer.engine.device": ("gpu:1", "explorer.engine.device must be"),
        "explorer.engine.tensor_parallel_size": (2, None),  # with device cuda:1 below: one GPU named
        "explorer.engine.max_lora_rank": (12, r"max_lora_rank must be one of \(0, 1, 8, 16, .*\), got 12"),
        "explorer.engine.gpu_memory_utilization": (1.5, r"gpu_memory_utilization must be in \[0, 1\], got 1.5"),
    }
    for key, (value, match) in bad.items():
        extra = {"explorer.engine.device": "cuda:1"} if key.endswith("tensor_parallel_size") else {}
        with pytest.raises(ValueError, match=match or "needs as many GPUs"):
            config(tmp_path, **{key: value, **extra})
    with pytest.raises(ValueError, match="must not set 'max_model_len': use explorer.engine.max_model_len instead"):
        config(tmp_path, **{"explorer.engine.engine_args": {"max_model_len": 64}})
    with pytest.raises(ValueError, match="must not set 'enable_lora': rlpipe sets it itself"):
        config(tmp_path, **{"explorer.engine.engine_args": {"enable_lora": False}})
    with pytest.raises(ValueError, match="learner.rank 600 is above the largest LoRA rank vLLM serves"):
        config(tmp_path, **{"learner.rank": 600})
    assert config(tmp_path, **{"learner.rank": 600, "explorer.sampler": "local"}).learner.rank == 600


def test_lora_rank_is_rounded_up_and_logged(caplog):
    with caplog.at_level(logging.INFO, logger="rlpipe.sampling.vllm_args"):
        assert lora_rank_for(12) == 16
    assert "the engine uses 16 for rank-12 adapters" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="rlpipe.sampling.vllm_args"):
        assert lora_rank_for(16) == 16 and lora_rank_for(1) == 1 and lora_rank_for(300) == 320
    assert "rank-16" not in caplog.text and "rank-300" in caplog.text
    with pytest.raises(ValueError, match="above the largest rank vLLM serves"):
        lora_rank_for(513)


def test_engine_options_from_the_run_config(tmp_path):
    cfg = config(tmp_path, **{"learner.rank": 12, "max_staleness": 2, "explorer.engine.max_model_len": 256,
                              "explorer.engine.gpu_memory_utilization": 0.4,
                              "explorer.engine.engine_args": {"max_num_seqs": 32}})
    assert engine_options(cfg, "vllm") == {  # "" and 0: vLLM's default
        "max_loaded_adapters": 4, "max_lora_rank": 12, "max_model_len": 256, "dtype": "", "enforce_eager": True,
        "gpu_memory_utilization": 0.4, "tensor_parallel_size": 1, "device": "", "max_num_seqs": 32,
    }
    local = config(tmp_path, **{"explorer.sampler": "local", "explorer.engine.device": "cuda:1",
                                "explorer.engine.dtype": "bfloat16"})
    assert engine_options(local, "local") == {"max_loaded_adapters": 3, "max_model_len": None, "dtype": "bfloat16", "device": "cuda"}


def test_device_sets_cuda_visible_devices(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")  # restored after the test
    use_device("cuda:1")
    assert __import__("os").environ["CUDA_VISIBLE_DEVICES"] == "3"  # counted among the GPUs the process sees
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    with pytest.raises(ValueError, match="sees only GPUs"):
        use_device("cuda:2")
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    use_device("cuda:0,1")
    assert __import__("os").environ["CUDA_VISIBLE_DEVICES"] == "0,1"
    use_device("cpu")
    assert __import__("os").environ["CUDA_VISIBLE_DEVICES"] == ""


# --------------------------------------------------------------------------- the vLLM config (no engine started)


def head_dim_16_config(tmp_path):
    """A Llama config with head_dim 16 (hidden 64 / 4 heads): all the CPU check reads."""
    path = tmp_path / "head-dim-16"
    path.mkdir()
    (path / "config.json").write_text(json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"],
                                                  "hidden_size": 64, "num_attention_heads": 4}))
    return str(path)


def test_unknown_engine_args_are_named(tiny_model_path):
    pytest.importorskip("vllm")
    from rlpipe.sampling.vllm_args import check_engine_args

    check_engine_args({"max_num_seqs": 8, "enable_prefix_caching": False})
    with pytest.raises(ValueError, match=r"'max_num_seq' is not a vllm.AsyncEngineArgs field \(did you mean 'max_num_seqs'"):
        check_engine_args({"max_num_seq": 8})
    with pytest.raises(ValueError, match="'max_loras'.*rlpipe sets it itself"):
        check_engine_args({"max_loras": 8})


def test_options_reach_the_vllm_config(tmp_path, tiny_model_path):
    pytest.importorskip("vllm")
    from vllm.platforms import current_platform

    from rlpipe.sampling.vllm_args import engine_config

    cfg = config(tmp_path, base_model=tiny_model_path, **{"learner.rank": 12, "explorer.engine.max_model_len": 256,
                                                          "explorer.engine.engine_args": {"max_num_seqs": 32}})
    vllm_config = engine_config(tiny_model_path, **engine_options(cfg, "vllm"))
    assert vllm_config.model_config.max_model_len == 256
    assert vllm_config.lora_config.max_lora_rank == 16  # rank 12 rounded up
    assert vllm_config.lora_config.max_loras == 3 + current_platform.is_cpu()
    assert vllm_config.scheduler_config.max_num_seqs == 32
    assert vllm_config.model_config.logprobs_mode == "processed_logprobs"
    if current_platform.is_cpu():
        # tiny model: 2 layers x 2 kv heads x head_dim 32 x (K, V) x 4 bytes = 1 KiB a token;
        # 32 sequences x 256 tokens = 8 MiB, below the 64 MiB floor
        assert vllm_config.cache_config.kv_cache_memory_bytes == 64 * MiB
        assert vllm_config.parallel_config.distributed_executor_backend == "uni"
        full = engine_config(tiny_model_path, max_loaded_adapters=2, max_lora_rank=8)  # 128 x 1024 tokens
        assert full.cache_config.kv_cache_memory_bytes == int(1.1 * 128 * 1024 * 1024) < CPU_KV_CACHE_CAP
        chosen = engine_config(tiny_model_path, max_loaded_adapters=2, max_lora_rank=8, kv_cache_memory_bytes=300 * MiB,
                               distributed_executor_backend="mp")
        assert chosen.cache_config.kv_cache_memory_bytes == 300 * MiB
        assert chosen.parallel_config.distributed_executor_backend == "mp"


def test_settings_vllm_refuses_name_the_model(tiny_model_path):
    pytest.importorskip("vllm")
    from rlpipe.sampling import EngineStartError
    from rlpipe.sampling.vllm_args import engine_config

    with pytest.raises(EngineStartError, match=rf"(?s)vLLM refuses the engine settings for {tiny_model_path}: .*max_model_len \(100000\)"):
        engine_config(tiny_model_path, max_loaded_adapters=2, max_lora_rank=8, max_model_len=100_000)


def test_head_dim_the_cpu_backend_cannot_run(tmp_path):
    pytest.importorskip("vllm")
    from vllm.platforms import current_platform

    from rlpipe.sampling import EngineStartError
    from rlpipe.sampling.vllm_args import engine_config, model_head_dim

    if not current_platform.is_cpu():
        pytest.skip("the head_dim check is for vLLM's CPU attention backend")
    model = head_dim_16_config(tmp_path)
    assert model_head_dim(model) == 16
    with pytest.raises(EngineStartError, match=rf"vLLM cannot run {model} on CPU: its attention head_dim is 16, "
                                               r"and vLLM's CPU attention backend supports only head_dim in \[32, 64"):
        engine_config(model, max_loaded_adapters=2, max_lora_rank=8)


# --------------------------------------------------------------------------- on the shared engine


@pytest.mark.slow
def test_rank_12_adapter_matches_peft(vllm_engine, tiny_model_path, make_lora_adapter, reference_logprobs):
    """vLLM pads an adapter below the engine's max_lora_rank: a rank-12 adapter (not a rank
    vLLM accepts for max_lora_rank) samples with the logprobs peft gives it."""
    from rlpipe.sampling import create_sampling_client
    from rlpipe.types import ModelInput, SamplingParams

    assert vllm_engine.max_lora_rank > 12 and vllm_engine.max_lora_rank != 12
    adapter = make_lora_adapter(seed=12, rank=12)
    client = create_sampling_client(tiny_model_path, adapter, policy_version=12)
    prompt = [3, 40, 50, 60, 4]
    seqs = client.sample(ModelInput.from_ints(prompt), 8, SamplingParams(max_tokens=24, seed=1)).result().sequences
    worst = max(max(abs(a - b) for a, b in zip(s.logprobs, reference_logprobs(prompt, s.tokens, adapter))) for s in seqs)
    assert worst <= 1e-3
    base = create_sampling_client(tiny_model_path).compute_logprobs(ModelInput.from_ints(prompt + seqs[0].tokens)).result()
    assert max(abs(a - b) for a, b in zip(base[len(prompt):], seqs[0].logprobs)) > 1e-3  # the adapter did change them
