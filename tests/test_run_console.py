"""Two `rlpipe run`s at once on this machine, with no [addresses] in their configs: both finish
(each picked its own free ports), their consoles carry only rlpipe's lines (no vLLM, Triton
or transformers output, line by line), and each wrote TensorBoard events that TensorBoard's
own reader parses with the grouped metric names, and a curves.png."""

import json
import os
import re
import signal
import subprocess
import sys

import pytest
from pathlib import Path

pytestmark = pytest.mark.slow  # processes, engines or servers: not in the quick tier (pytest -m "not slow")

REPO = Path(__file__).resolve().parent.parent
SAMPLER = "vllm" if __import__("importlib").util.find_spec("vllm") else "local"
CONSOLE_LINE = re.compile(r"^(step \d+/\d+  ETA \S+  reward \d\.\d{3}(  [a-z_ /]+ \S+)*|curves: \S+curves\.png)$")


def config(tmp_path: Path, name: str) -> Path:
    path = tmp_path / f"{name}.toml"
    path.write_text("\n".join([
        f'name = "{name}"', f'runs_dir = "{tmp_path}"', "groups_per_batch = 4",
        "[dataset]", 'factory = "envs.toy:DigitsDataset"', "args = { group_size = 8 }",
        "[explorer]", f'sampler = "{SAMPLER}"', "concurrency = 8", "max_tokens = 8",
        "[learner]", "steps = 4", "rank = 8", "learning_rate = 2e-3", "batch_timeout_s = 300",
        "[logging]", "console_every = 1",
    ]) + "\n")
    return path


def test_two_runs_at_once_finish_with_clean_consoles_and_tensorboard(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env.pop("VLLM_LOGGING_LEVEL", None)  # vLLM as chatty as a user would get it
    procs = {name: subprocess.Popen([sys.executable, "-m", "rlpipe.cli", "run", config(tmp_path, name)], cwd=REPO,
                                    env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
             for name in ("first", "second")}
    outputs = {}
    try:
        for name, proc in procs.items():
            out, err = proc.communicate(timeout=480)
            outputs[name] = (proc.returncode, out.decode(), err.decode())
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGINT)
                proc.wait(60)
    for name, (code, out, err) in outputs.items():
        assert code == 0, f"{name}: {err[-3000:]}"
        lines = out.splitlines()
        assert err == "", f"{name} wrote to stderr: {err[-2000:]}"
        bad = [line for line in lines if not CONSOLE_LINE.match(line)]
        assert not bad, f"{name}: lines that are not rlpipe's: {bad[:5]}"
        assert [line.split()[1] for line in lines if line.startswith("step ")] == ["1/4", "2/4", "3/4", "4/4"]
        run_dir = tmp_path / name
        assert lines[-1] == f"curves: {run_dir / 'curves.png'}"
        assert (run_dir / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        log = (run_dir / "logs" / "explorer.log").read_text()
        assert "WARNING" in log  # the engine's output went to the role's log, not to the console
        events = EventAccumulator(str(run_dir / "tensorboard"))
        events.Reload()
        tags = set(events.Tags()["scalars"])
        for expected in ("reward/mean", "env/digit_share", "loss/sum", "loss/ratio", "kl/sampler_learner",
                         "optim/grad_norm", "time/step_s", "time/learner_idle_frac", "time/sampler_busy_frac",
                         "sync/publish_s", "staleness/max", "tokens/trained_per_s", "buffer/last_seq"):
            assert expected in tags, (name, expected, sorted(tags))
        assert [e.step for e in events.Scalars("reward/mean")] == [1, 2, 3, 4]
        assert not [t for t in tags if ":" in t or "/" not in t], sorted(tags)
    addresses = [{k: v for k, v in json.loads((tmp_path / n / "config.json").read_text())["addresses"].items()
                  if k != "bind_public"} for n in procs]
    assert not set(addresses[0].values()) & set(addresses[1].values())  # each run picked its own ports
    assert all(a.startswith("tcp://127.0.0.1:") for a in addresses[0].values())
