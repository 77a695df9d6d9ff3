"""The pipeline through a Tinker endpoint: learner.backend = "tinker", explorer.sampler = "tinker".

A real `rlpipe serve` on loopback (module fixture) and the official tinker SDK in the
learner and explorer processes of a real `rlpipe run`, on the toy "digits" env that the
local-backend pipeline tests learn on (tests/test_pipeline.py).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import msgspec
import pytest

from rlpipe.metrics import read_metrics
from rlpipe.pipeline.config import load, redacted
from rlpipe.pipeline.stats import run_stats
from rlpipe.types import WeightUpdate
from tests.test_pipeline import REPO, accounting, assert_no_orphans, run_until_stopped, write_config
from tests.learning import holds

pytestmark = pytest.mark.slow  # processes, engines or servers: not in the quick tier (pytest -m "not slow")

pytest.importorskip("tinker", reason="the tinker SDK is not installed")

API_KEY = "tml-rlpipe-pipeline-test"


def tinker_config(tmp_path, name, url, **fields):
    """write_config's run with both sides on the Tinker endpoint at url (a top-level key)."""
    fields.setdefault("learner_lines", []).append('backend = "tinker"')
    path = write_config(tmp_path, name, sampler="tinker", **fields)
    path.write_text(f'tinker_base_url = "{url}"\ntinker_timeout_s = 120\n' + path.read_text())
    return path


@pytest.fixture(scope="module")
def endpoint(tiny_model_path, tmp_path_factory):
    """`rlpipe serve` with the tiny model, its sampling engine started (one sample) so that the
    runs below do not wait for it."""
    import tinker

    from tests.serve_helpers import ServeProcess

    server = ServeProcess(tiny_model_path, tmp_path_factory.mktemp("tinker-endpoint") / "state", api_key=API_KEY)
    server.start()
    try:
        service = tinker.ServiceClient(base_url=server.url, api_key=API_KEY)
        try:
            sampler = service.create_sampling_client(base_model=tiny_model_path).result(timeout=60)
            sampler.sample(tinker.types.ModelInput.from_ints([1, 2, 3]), 1,
                           tinker.types.SamplingParams(max_tokens=2)).result(timeout=180)
            service.close("success").result(timeout=30)
        except Exception as err:  # noqa: BLE001  (the SDK retries a failing server for minutes, then says little)
            pytest.fail(f"rlpipe serve did not sample: {type(err).__name__}: {err}\n{server.log_tail()}")
        yield server
    finally:
        left = server.stop()
        assert left == [], f"rlpipe serve left processes behind: {left}"


@pytest.fixture
def client_env(monkeypatch):
    """The API key from the environment (the URL comes from the run config), as the SDK reads it."""
    monkeypatch.setenv("TINKER_API_KEY", API_KEY)
    monkeypatch.setenv("TINKER_TELEMETRY", "0")
    monkeypatch.delenv("TINKER_BASE_URL", raising=False)


def test_the_config_pairs_learner_and_explorer_on_tinker(tmp_path):
    url = "http://127.0.0.1:9"

    def config(name, backend, sampler, head=""):
        path = write_config(tmp_path, name, sampler=sampler, learner_lines=[f'backend = "{backend}"'])
        path.write_text(head + path.read_text())
        return path

    with pytest.raises(ValueError, match='explorer.sampler = "tinker" needs learner.backend = "tinker"'):
        load(config("a", "local", "tinker"))
    with pytest.raises(ValueError, match='learner.backend = "tinker" needs explorer.sampler = "tinker"'):
        load(config("b", "tinker", "local"))
    with pytest.raises(ValueError, match=r"learner\.backend must be one of \('local', 'tinker'\), got 'remote'"):
        load(config("c", "remote", "tinker"))
    with pytest.raises(ValueError, match=r"explorer\.sampler"):
        load(config("d", "tinker", "tinkr"))
    with pytest.raises(ValueError, match='tinker_api_key must be "" or a key starting with "tml-"'):
        load(config("e", "tinker", "tinker", head='tinker_api_key = "secret"\n'))
    with pytest.raises(ValueError, match="tinker_base_url must be an http"):
        load(config("f", "tinker", "tinker", head='tinker_base_url = "127.0.0.1:8000"\n'))
    good = load(config("g", "tinker", "tinker", head=f'tinker_base_url = "{url}"\ntinker_api_key = "tml-x"\n'))
    assert (good.learner.backend, good.explorer.sampler, good.tinker_base_url) == ("tinker", "tinker", url)
    assert redacted(good).tinker_api_key == "***" and good.tinker_api_key == "tml-x"
    assert load(config("h", "local", "local")).learner.backend == "local"  # the default stays local
    # `rlpipe run` refuses such a config before starting anything
    out = subprocess.run([sys.executable, "-m", "rlpipe.cli", "run", str(config("i", "local", "tinker"))],
                         cwd=REPO, capture_output=True, text=True, timeout=120, check=False)
    assert out.returncode != 0 and 'needs learner.backend = "tinker"' in out.stderr
    assert not (tmp_path / "i").exists()


def test_weight_updates_stay_wire_compatible():
    old = msgspec.msgpack.encode(WeightUpdate(version=3, adapter_config=b"{}", adapter_weights=b"w", step=3))
    assert b"sampler_path" not in old  # an update with bytes looks as it did
    decoded = msgspec.msgpack.decode(old, type=WeightUpdate)
    assert decoded.sampler_path is None and decoded.adapter_weights == b"w"
    path = "tinker://s:train:0/sampler_weights/v000003"
    wire = msgspec.msgpack.encode(WeightUpdate(version=3, sampler_path=path))
    assert msgspec.msgpack.decode(wire, type=WeightUpdate) == WeightUpdate(version=3, sampler_path=path)


@pytest.mark.learning
def test_the_pipeline_learns_through_a_tinker_endpoint(endpoint, client_env, tmp_path, learning_seed):
    steps = 14
    evaluation = ['eval_factory = "envs.arithmetic:eval_items"', "eval_args = { n = 12, difficulty = 1 }",
                  'nll_eval_factory = "envs.arithmetic:answer_datums"', "nll_eval_args = { n = 8 }"]
    config = tinker_config(tmp_path, "tk", endpoint.url, steps=steps, max_staleness=1, checkpoint_every=5,
                           episode_timeout_s=120, eval_every=7, dataset_lines=evaluation)
    code, out, seconds = run_until_stopped(config, "--set", f"seed={learning_seed}", timeout_s=400)
    run_dir = tmp_path / "tk"
    assert code == 0, out[-3000:] + "\n--- server ---\n" + endpoint.log_tail()
    records = read_metrics(run_dir / "metrics.jsonl")
    assert [r["step"] for r in records] == list(range(1, steps + 1))
    rewards = [round(r["reward/mean"], 3) for r in records]
    first, last = sum(rewards[:4]) / 4, sum(rewards[-4:]) / 4
    print(f"\nreward/mean by step: {rewards}\nfirst 4: {first:.3f}, last 4: {last:.3f}, run took {seconds:.0f} s")
    holds(last - first, ">", 0.05, "mean reward of the last 4 steps - the first 4")
    assert max(r["staleness/max"] for r in records) <= 1
    assert all("loss/sum" in r and "optim/grad_norm" in r for r in records)  # the endpoint's metrics
    assert records[-1]["explorer/version"] >= steps - 2  # the explorer followed the learner's versions
    for r in (records[6], records[13]):  # evaluations through the endpoint: greedy samples and a forward pass
        assert r["eval/n"] == 12 and 0 <= r["eval/accuracy"] <= 1 and r["eval/nll"] > 0 and r["eval/tokens"] > 0

    # The WeightUpdates carried tinker:// sampler paths, and the explorer sampled them (no engine of its own).
    explorer_log = (run_dir / "logs" / "explorer.log").read_text()
    learner_log = (run_dir / "logs" / "learner.log").read_text()
    published = [line.split(": ", 1)[1] for line in learner_log.splitlines() if "published version" in line]
    assert len(published) == steps + 1 and all(p.startswith("tinker://") and "/sampler_weights/" in p
                                                for p in published)
    sampled = {line.split("sampling with ")[1].split()[0] for line in explorer_log.splitlines() if "sampling with tinker://" in line}
    assert len(sampled) >= steps - 2 and sampled <= set(published)
    assert "vLLM engine" not in explorer_log and "engine for" not in explorer_log
    import tinker

    rest = tinker.ServiceClient(base_url=endpoint.url, api_key=API_KEY).create_rest_client()
    run_id = published[0].removeprefix("tinker://").split("/")[0]
    on_endpoint = rest.list_checkpoints(run_id).result(timeout=30).checkpoints
    on_endpoint = {c.tinker_path for c in on_endpoint if c.checkpoint_type == "sampler"}
    # No pile-up: the newest max_staleness + 2 versions stay (TinkerTrainingClient.keep_versions),
    # and the newest keep_checkpoints evaluation weights.
    assert {p for p in on_endpoint if "/sampler_weights/v" in p} == set(published[-3:]), (on_endpoint, published)
    assert len([p for p in on_endpoint if "/sampler_weights/eval-" in p]) == 2  # evaluated at steps 7 and 14

    # Checkpoints are tinker:// paths on the endpoint, with the step recorded in the run dir.
    latest = json.loads((run_dir / "learner" / "latest.json").read_text())
    assert latest["path"].startswith("tinker://") and "/weights/" in latest["path"] and latest["step"] == steps
    recorded = json.loads((run_dir / "learner" / "tinker.json").read_text())["checkpoints"]
    assert recorded[latest["path"]]["step"] == steps and len(recorded) <= 3  # keep_checkpoints = 3

    # Nothing lost between explorer and buffer, as `rlpipe stats` tells.
    accounting(run_dir)
    assert run_stats(run_dir)["lost"] == 0
    stats = subprocess.run([sys.executable, "-m", "rlpipe.cli", "stats", str(run_dir), "--json"], cwd=REPO,
                           capture_output=True, text=True, timeout=60, check=False)
    assert stats.returncode == 0 and json.loads(stats.stdout)["lost"] == 0
    assert_no_orphans(run_dir)

    # Resumed: a new training client from the last checkpoint, with its optimizer, goes on at step 15.
    code, out, _ = run_until_stopped(config, "--resume", "--set", f"learner.steps={steps + 2}", timeout_s=300)
    assert code == 0, out[-3000:] + "\n--- server ---\n" + endpoint.log_tail()
    records = read_metrics(run_dir / "metrics.jsonl")
    assert [r["step"] for r in records][-3:] == [steps, steps + 1, steps + 2]
    learner_log = (run_dir / "logs" / "learner.log").read_text()
    assert f"load state with optimizer from {latest['path']}" in learner_log
    assert run_stats(run_dir)["lost"] == 0


def test_a_model_the_endpoint_does_not_serve_stops_the_run(endpoint, client_env, tmp_path, tiny_model_path):
    other = tmp_path / "other-model"
    shutil.copytree(tiny_model_path, other)  # a fine model, but not one this endpoint serves
    config = tinker_config(tmp_path, "unserved", endpoint.url, base_model=str(other))
    code, out, seconds = run_until_stopped(config, timeout_s=180)
    assert code == 1, out[-3000:]
    assert "is not served here" in out and "Unrecoverable" in out, out[-3000:]
    assert seconds < 120
