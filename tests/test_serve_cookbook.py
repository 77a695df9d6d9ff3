"""tinker-cookbook's own recipes, unchanged, against `rlpipe serve` on the embedded model:
chat_sl on a local conversations file, then math_rl (env=arithmetic) continuing from the
SL checkpoint. The cookbook is a test dependency (.ci/setup installs it)."""

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow  # processes, engines or servers: not in the quick tier (pytest -m "not slow")

pytest.importorskip("tinker_cookbook")


def arithmetic_conversations(path, n=64, seed=0):
    import random

    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(n):
            x, y = rng.randint(0, 100), rng.randint(0, 100)
            messages = [{"role": "user", "content": "What is 4 + 5?"}, {"role": "assistant", "content": "9"},
                        {"role": "user", "content": f"What is {x} + {y}?"}, {"role": "assistant", "content": str(x + y)}]
            f.write(json.dumps({"messages": messages}) + "\n")


def recipe(module, args, server, timeout_s=300):
    env = dict(os.environ, **server.client_env(), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    cmd = [sys.executable, "-m", module, *args, f"base_url={server.url}", "behavior_if_log_dir_exists=delete",
           "renderer_name=role_colon"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout_s)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


def rows(log_path):
    return [json.loads(line) for line in open(log_path / "metrics.jsonl")]


def test_chat_sl_then_math_rl_recipes_run_unchanged(tinker_server, tiny_model_path, tmp_path):
    from tinker_cookbook import checkpoint_utils

    data = tmp_path / "arith.jsonl"
    arithmetic_conversations(data)
    sl = tmp_path / "sl"
    recipe("tinker_cookbook.recipes.chat_sl.train", [f"model_name={tiny_model_path}", f"dataset={data}", f"log_path={sl}",
           "batch_size=16", "learning_rate=3e-3", "lora_rank=8", "max_length=128", "num_epochs=2", "save_every=0",
           "eval_every=0"], tinker_server)
    nll = [r["train_mean_nll"] for r in rows(sl) if "train_mean_nll" in r]
    assert len(nll) == 8 and nll[-1] < nll[0]
    state = checkpoint_utils.get_last_checkpoint(str(sl)).state_path
    assert state.startswith("tinker://") and state.endswith("/weights/final")

    rl = tmp_path / "rl"
    recipe("tinker_cookbook.recipes.math_rl.train", ["env=arithmetic", f"model_name={tiny_model_path}", f"log_path={rl}",
           f"load_checkpoint_path={state}", "loss_fn=importance_sampling", "group_size=4", "groups_per_batch=4",
           "learning_rate=1e-3", "lora_rank=8", "max_tokens=6", "max_steps=2", "eval_every=0", "save_every=0"], tinker_server)
    steps = [r for r in rows(rl) if "env/all/reward/total" in r]
    assert len(steps) == 2
    for r in steps:  # 16 episodes a step, sampled with logprobs that match the learner's
        assert r["env/all/total_episodes"] == 16 and abs(r["optim/kl_sample_train_v1"]) < 1e-3
    final = checkpoint_utils.get_last_checkpoint(str(rl))
    assert final.sampler_path.endswith("/sampler_weights/final")
