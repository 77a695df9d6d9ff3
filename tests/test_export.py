"""`rlpipe export` on run directories laid out as the learner writes them: a real TrainingClient
trains two steps and checkpoints after each. The exports are checked with stock transformers,
peft and vLLM, against the base + adapter as peft computes it."""

import argparse
import json
import os
import shutil
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file as weights
from transformers import AutoModelForCausalLM, AutoTokenizer

from rlpipe import types
from rlpipe.cli import export
from rlpipe.testing.families import family_model_path
from rlpipe.pipeline.config import RunConfig, dump
from rlpipe.training.client import TrainingClient

# The reference peft model on a tied base warns about LoRA on the tied lm_head; that case is the point.
pytestmark = pytest.mark.filterwarnings("ignore:.*tie_word_embeddings:UserWarning")
TEXTS = ["12 + 7 = 19", "the answer is 42 and the sum is 7", "3 * 4 = 12"]


def make_run(root: Path, base: str, config_base: str, steps: int = 2) -> Path:
    """A run directory with config.json and a learner checkpoint after each of `steps` SFT
    steps (LoRA on attention, MLP and lm_head), learner/latest.json as Learner._checkpoint writes it."""
    config = RunConfig(name="run", runs_dir=str(root), base_model=config_base)
    run_dir = config.run_dir
    run_dir.mkdir(parents=True)
    (run_dir / "config.json").write_bytes(dump(config))
    client = TrainingClient(base, types.LoraConfig(rank=4, seed=0, train_unembed=True), run_dir / "learner")
    try:
        tok = client.get_tokenizer()
        data = []
        for text in TEXTS:
            ids = tok(text)["input_ids"] + [tok.eos_token_id]
            data.append(types.Datum(model_input=types.ModelInput.from_ints(ids[:-1]),
                                    loss_fn_inputs={"target_tokens": ids[1:], "weights": np.ones(len(ids) - 1, np.float32)}))
        for _ in range(steps):
            client.forward_backward(data, "cross_entropy").result()
            client.optim_step(types.AdamParams(learning_rate=2e-2)).result()  # LoRA B starts at 0: move it
            path = client.save_state(f"step-{client.step:06d}").result().path
            (run_dir / "learner" / "latest.json").write_text(json.dumps(
                {"path": path, "step": client.step, "after_seq": 0, "groups_trained": 0, "incarnation": 1}))
    finally:
        client.close()
    return run_dir


def state(run_dir: Path, step: int) -> Path:
    return run_dir / "learner" / "state" / f"step-{step:06d}"


def load(path, adapter=None):
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
    return (PeftModel.from_pretrained(model, str(adapter)) if adapter else model).eval()


@torch.no_grad()
def logits(model, ids):
    return model(input_ids=torch.tensor([ids])).logits[0].double()


def token_ids(base):
    tok = AutoTokenizer.from_pretrained(str(base))
    return tok("the answer is 42 and 12 + 7 = 19")["input_ids"]


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def tiny_run(tiny_model_path, tmp_path_factory):
    """The embedded tiny Llama (untied embeddings), base_model "" in the config."""
    return make_run(tmp_path_factory.mktemp("tiny"), tiny_model_path, "")


@pytest.fixture(scope="module")
def qwen3_base():
    return family_model_path("qwen3")  # tied embeddings, as Qwen3-0.6B..4B


@pytest.fixture(scope="module")
def qwen3_run(qwen3_base, tmp_path_factory):
    return make_run(tmp_path_factory.mktemp("qwen3"), str(qwen3_base), str(qwen3_base))


@pytest.fixture(scope="module")
def qwen3_merged(qwen3_run, tmp_path_factory):
    return export.export_merged(qwen3_run, tmp_path_factory.mktemp("exports") / "qwen3-merged")


def test_merged_untied_equals_base_plus_adapter(tiny_run, tiny_model_path, tmp_path, capsys):
    out = tmp_path / "merged"
    export.main(argparse.Namespace(run_dir=str(tiny_run), step=None, merged=str(out), peft=None))
    assert str(out) in capsys.readouterr().out
    assert not any(p.name.startswith("adapter") for p in out.iterdir())  # a plain model, no adapter left
    ids = token_ids(tiny_model_path)
    want = logits(load(tiny_model_path, state(tiny_run, 2) / "adapter"), ids)
    got = logits(load(out), ids)
    print(f"untied merged vs peft: max |d logit| {(got - want).abs().max():.2e}")
    assert (got - want).abs().max() < 1e-4
    assert (got - logits(load(tiny_model_path), ids)).abs().max() > 1e-2  # the adapter did something
    tok, base_tok = AutoTokenizer.from_pretrained(str(out)), AutoTokenizer.from_pretrained(tiny_model_path)
    assert tok(TEXTS[1])["input_ids"] == base_tok(TEXTS[1])["input_ids"]
    assert tok.chat_template == base_tok.chat_template and tok.eos_token == base_tok.eos_token


@pytest.mark.slow
def test_merged_tied_unties_and_keeps_the_embedding(qwen3_merged, qwen3_run, qwen3_base):
    config = json.loads((qwen3_merged / "config.json").read_text())
    assert config["tie_word_embeddings"] is False
    saved = weights(qwen3_merged / "model.safetensors")
    base = load(qwen3_base)
    assert base.get_output_embeddings().weight is base.get_input_embeddings().weight  # the case under test
    assert torch.equal(saved["model.embed_tokens.weight"], base.get_input_embeddings().weight)
    assert not torch.equal(saved["lm_head.weight"], saved["model.embed_tokens.weight"])
    merged = load(qwen3_merged)
    assert merged.get_output_embeddings().weight is not merged.get_input_embeddings().weight
    assert torch.equal(merged.get_input_embeddings().weight, base.get_input_embeddings().weight)
    ids = token_ids(qwen3_base)
    want = logits(load(qwen3_base, state(qwen3_run, 2) / "adapter"), ids)
    got = logits(merged, ids)
    print(f"tied merged vs peft: max |d logit| {(got - want).abs().max():.2e}")
    assert (got - want).abs().max() < 1e-4
    assert (got - logits(base, ids)).abs().max() > 1e-2


def test_merged_keeps_the_base_dtype(qwen3_run, tmp_path):
    """The same shapes and tokenizer in bfloat16: the qwen3 run's checkpoint, moved to a run
    directory whose base is that model (latest.json's recorded path is then stale)."""
    base = family_model_path("qwen3", dtype="bfloat16", train_steps=0)
    config = RunConfig(name="bf16", runs_dir=str(tmp_path), base_model=str(base))
    config.run_dir.mkdir()
    (config.run_dir / "config.json").write_bytes(dump(config))
    shutil.copytree(qwen3_run / "learner", config.run_dir / "learner")
    out = export.export_merged(config.run_dir, tmp_path / "merged")
    saved = weights(out / "model.safetensors")
    assert {t.dtype for t in saved.values()} == {torch.bfloat16}
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    base_model = AutoModelForCausalLM.from_pretrained(str(base))
    assert torch.equal(saved["model.embed_tokens.weight"], base_model.get_input_embeddings().weight)
    ids = token_ids(base)
    want = logits(load(base, state(qwen3_run, 2) / "adapter"), ids)
    diff = (logits(load(out), ids) - want).abs().max()
    print(f"bf16 merged vs fp32 peft: max |d logit| {diff:.2e}")
    assert diff < 0.1  # bf16 rounding; a wrong merge is off by > 1


def test_peft_export_reloads_to_the_same_logits(tiny_run, tiny_model_path, tmp_path):
    out = export.export_peft(tiny_run, tmp_path / "lora")
    assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == os.path.abspath(tiny_model_path)
    ids = token_ids(tiny_model_path)
    got = logits(load(config["base_model_name_or_path"], out), ids)
    want = logits(load(tiny_model_path, state(tiny_run, 2) / "adapter"), ids)
    assert torch.equal(got, want)
    assert (got - logits(load(tiny_model_path), ids)).abs().max() > 1e-2


def test_step_selects_the_checkpoint(tiny_run, tmp_path):
    (tmp_path / "one").mkdir()  # an empty output directory is taken
    first = export.export_peft(tiny_run, tmp_path / "one", step=1)
    newest = export.export_peft(tiny_run, tmp_path / "newest")
    one, two = (weights(p / "adapter_model.safetensors") for p in (first, newest))
    assert same(one, weights(state(tiny_run, 1) / "adapter" / "adapter_model.safetensors"))
    assert same(two, weights(state(tiny_run, 2) / "adapter" / "adapter_model.safetensors"))
    assert not same(one, two)


def test_bad_requests_are_refused_with_a_clear_line(tiny_run, tmp_path):
    full = tmp_path / "full"
    full.mkdir()
    (full / "x").write_text("keep me")
    with pytest.raises(export.ExportError, match="already exists and is not empty"):
        export.export_merged(tiny_run, full)
    assert (full / "x").read_text() == "keep me"
    with pytest.raises(export.ExportError, match="does not exist"):
        export.export_peft(tmp_path / "nowhere", tmp_path / "out")
    empty = tmp_path / "empty-run"
    empty.mkdir()
    with pytest.raises(export.ExportError, match="no config.json"):
        export.export_peft(empty, tmp_path / "out")
    (empty / "config.json").write_bytes(dump(RunConfig()))
    with pytest.raises(export.ExportError, match="no learner checkpoints"):
        export.export_peft(empty, tmp_path / "out")
    with pytest.raises(export.ExportError, match=r"no checkpoint for step 7; available steps: 1, 2"):
        export.export_peft(tiny_run, tmp_path / "out", step=7)
    # A checkpoint cut short (no rlpipe_state.json, written last) is not offered.
    (state(tiny_run, 3) / "adapter").mkdir(parents=True)
    try:
        with pytest.raises(export.ExportError, match=r"step 3; available steps: 1, 2 "):
            export.export_merged(tiny_run, tmp_path / "out", step=3)
    finally:
        shutil.rmtree(state(tiny_run, 3))
    assert not (tmp_path / "out").exists()  # nothing half-written
    with pytest.raises(SystemExit, match=r"^rlpipe export: .*step 9; available steps: 1, 2"):
        export.main(argparse.Namespace(run_dir=str(tiny_run), step=9, merged=None, peft=str(tmp_path / "out")))
    with pytest.raises(SystemExit, match="exactly one of --merged OUT or --peft OUT"):
        export.main(argparse.Namespace(run_dir=str(tiny_run), step=None, merged="a", peft="b"))


@pytest.mark.slow
def test_merged_export_runs_in_vllm(qwen3_merged):
    """vLLM loads the untied export (its own engine) and scores a prompt as transformers does."""
    pytest.importorskip("vllm", reason="vLLM is not installed")
    from rlpipe.sampling import start_engine
    from rlpipe.sampling.client import SamplingClient

    ids = token_ids(qwen3_merged)
    lp = torch.log_softmax(logits(load(qwen3_merged), ids), -1)
    want = lp[:-1].gather(1, torch.tensor(ids[1:])[:, None])[:, 0].numpy()
    # Other engines of the test session (the shared one) are not this test's to stop.
    before = {p.pid for p in psutil.Process().children(recursive=True) if "EngineCore" in p.name()}
    engine = start_engine(str(qwen3_merged), "vllm", max_loaded_adapters=1, max_lora_rank=8, max_model_len=256,
                          kv_cache_memory_bytes=1 << 28)
    try:
        cores = [p for p in psutil.Process().children(recursive=True) if "EngineCore" in p.name() and p.pid not in before]
        got = SamplingClient(engine, None, 0).compute_logprobs(types.ModelInput.from_ints(ids)).result()
    finally:
        engine.shutdown()
    assert got[0] is None
    diff = np.abs(np.array(got[1:]) - want).max()
    print(f"vLLM vs transformers on the merged model: max |d logprob| {diff:.2e}")
    assert diff < 1e-4
    assert cores, "no EngineCore process found: the check below would prove nothing"
    _, alive = psutil.wait_procs(cores, timeout=10)
    assert not alive, f"EngineCore processes left running: {alive}"
