"""Real model families through the whole pipeline: `rlpipe run` on a tied-embedding Qwen3-shaped
model (the shape of Qwen3-0.6B..4B and Llama-3.2-1B/3B), LoRA on lm_head included.

Real processes, sockets and sampler; the model is a tiny random-init Qwen3 built locally
(rlpipe.testing.families)."""

import json
import subprocess
import sys

import pytest

from rlpipe.pipeline.config import RunConfig, resolve_train_unembed
from rlpipe.testing.families import family_model_path
from rlpipe.metrics import read_metrics
from tests.test_pipeline import accounting, assert_no_orphans, run_to_end, write_config

pytestmark = pytest.mark.slow  # processes, engines or servers: not in the quick tier (pytest -m "not slow")


def test_tied_qwen3_trains_every_step_with_lora_on_lm_head(tmp_path):
    model = family_model_path("qwen3")
    assert json.loads((model / "config.json").read_text())["tie_word_embeddings"] is True
    # Synchronous, so that every trained token was sampled by the very weights being trained:
    # the learner's logprobs must then equal the sampler's (fp32 on CPU).
    config = write_config(tmp_path, "qwen3", base_model=model, steps=4, max_staleness=0)
    run_to_end(config)
    run_dir = tmp_path / "qwen3"
    records = read_metrics(run_dir / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    for r in records:
        assert r["buffer/groups"] == 4 and r["staleness/max"] == 0
        assert r["kl/sampler_learner"] < 1e-4, r  # sampler and learner agree on the tied model
        assert 0.999 < r["loss/ratio_min"] <= r["loss/ratio_max"] < 1.001, r
    assert records[-1]["explorer/version"] == 3  # the explorer hot-loaded each new adapter
    adapter = json.loads((run_dir / "learner" / "state" / "step-000004" / "adapter" / "adapter_config.json").read_text())
    assert "lm_head" in adapter["target_modules"]  # train_unembed was honoured, not dropped
    buffer, explorer = accounting(run_dir)
    assert explorer["groups_pushed"] == buffer["received"]
    assert_no_orphans(run_dir)


def test_train_unembed_follows_what_vllm_serves(tmp_path):
    """vLLM serves LoRA on lm_head for Qwen3 (tied) but not for Qwen2: an explicit request the
    sampler cannot serve is refused when the config is read, unset resolves to what it can."""
    pytest.importorskip("vllm", reason="vLLM is not installed: the local sampler serves any adapter")
    qwen2, qwen3 = str(family_model_path("qwen2")), str(family_model_path("qwen3"))
    config = RunConfig(base_model=qwen3)
    config.explorer.sampler = "vllm"
    assert resolve_train_unembed(config) is True
    config.base_model = qwen2
    assert resolve_train_unembed(config) is False  # unset: what the sampler can serve
    config.learner.train_unembed = False
    assert resolve_train_unembed(config) is False
    config.learner.train_unembed = True
    with pytest.raises(ValueError, match="train_unembed = false"):
        resolve_train_unembed(config)
    config.explorer.sampler = "local"  # peft serves it
    assert resolve_train_unembed(config) is True
    # and `rlpipe run` refuses it as a bad config, in one line, before any role starts
    cfg = write_config(tmp_path, "q2", base_model=qwen2, sampler="vllm")
    cfg.write_text(cfg.read_text().replace("[learner]\n", "[learner]\ntrain_unembed = true\n"))
    proc = subprocess.run([sys.executable, "-m", "rlpipe.cli", "run", str(cfg)], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode != 0
    assert "train_unembed" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "q2" / "pids.json").exists()  # no role was started
