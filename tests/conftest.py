import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from tests.learning import SEED, THREADS  # noqa: E402

if THREADS:
    os.environ["OMP_NUM_THREADS"] = str(THREADS)  # the processes the tests start take it too

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def torch_threads():
    """Every test starts at the same torch thread count (RLPIPE_TEST_THREADS, else torch's
    default), whatever the test before it set: an in-process Learner sets its own
    (learner.cpu_threads), which made later tests' float sums depend on test order."""
    import torch

    before = torch.get_num_threads()
    if THREADS:
        torch.set_num_threads(THREADS)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def learning_seed() -> int:
    """The seed a learning test varies (tests/learning.py): 0 unless RLPIPE_TEST_SEED says."""
    return SEED


@pytest.fixture(scope="session")
def tiny_model_path():
    """The embedded default model, built once per machine (a few seconds) and cached."""
    from rlpipe.testing.embedded import default_model_path

    return str(default_model_path())


# --------------------------------------------------------------------------- sampling (rlpipe/sampling)


@pytest.fixture(scope="session")
def vllm_engine(tiny_model_path):
    """The ONE vLLM engine of the test session for the tiny model (~25 s to start on CPU).
    create_sampling_client(tiny_model_path) anywhere in the session reuses it."""
    pytest.importorskip("vllm", reason="vLLM is not installed: vLLM sampling tests skipped")
    from rlpipe.sampling import get_engine
    from rlpipe.sampling import shutdown_engines

    engine = get_engine(tiny_model_path, "vllm")
    yield engine
    shutdown_engines()


@pytest.fixture(scope="session")
def make_lora_adapter(tiny_model_path, tmp_path_factory):
    """make_lora_adapter(seed, scale=0.05, rank=8) -> a PEFT adapter dir on the tiny model with
    random non-zero lora_B (standard targets incl. lm_head, alpha 32), saved as the learner does."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    made = {}

    def make(seed: int, scale: float = 0.05, rank: int = 8) -> str:
        if (seed, scale, rank) in made:
            return made[seed, scale, rank]
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_pretrained(tiny_model_path, dtype=torch.float32)
        targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"]
        peft_model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=32, target_modules=targets))
        with torch.no_grad():
            for name, param in peft_model.named_parameters():
                if "lora_B" in name:
                    param.normal_(0.0, scale)
        out = tmp_path_factory.mktemp(f"lora-{seed}-{scale}-{rank}")
        peft_model.save_pretrained(out, save_embedding_layers=False)
        made[seed, scale, rank] = str(out)
        return str(out)

    return make


@pytest.fixture(scope="session")
def reference_logprobs(tiny_model_path):
    """reference_logprobs(prompt, completion, adapter=None, temperature=1.0, top_k=-1, top_p=1.0, base=None)
    -> logprob of each completion token under HF transformers (+ peft adapter; base defaults
    to the tiny model), with the
    sampling transforms applied independently of rlpipe.sampling: logits / T, keep the top_k
    largest, keep the nucleus (tokens whose higher-ranked mass is < top_p), log_softmax."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    models = {}

    def model_for(base, adapter):
        if (base, adapter) not in models:
            model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
            models[base, adapter] = (PeftModel.from_pretrained(model, adapter) if adapter else model).eval()
        return models[base, adapter]

    @torch.no_grad()
    def score(prompt, completion, adapter=None, temperature=1.0, top_k=-1, top_p=1.0, base=None):
        ids = torch.tensor([list(prompt) + list(completion)])
        logits = model_for(base or tiny_model_path, adapter)(input_ids=ids).logits[0, len(prompt) - 1 : -1].double()
        logits = logits / (temperature if temperature > 0 else 1.0)
        if top_k > 0:
            kth = logits.topk(top_k, dim=-1).values[:, -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if top_p < 1.0:
            probs, order = logits.softmax(-1).sort(dim=-1, descending=True)
            mass_before = probs.cumsum(-1) - probs
            keep = torch.zeros_like(logits, dtype=torch.bool).scatter(1, order, mass_before < top_p)
            logits = logits.masked_fill(~keep, float("-inf"))
        lp = torch.log_softmax(logits, dim=-1)
        return lp.gather(1, torch.tensor(list(completion))[:, None])[:, 0].tolist()

    return score


# --------------------------------------------------------------------------- rlpipe serve (rlpipe/serve)


@pytest.fixture(scope="session")
def tinker_server(tiny_model_path, tmp_path_factory):
    """ONE `rlpipe serve` process for the test session (its vLLM engine starts on first use),
    with the official tinker SDK pointed at it through TINKER_BASE_URL / TINKER_API_KEY."""
    pytest.importorskip("tinker", reason="the tinker SDK is not installed")
    from tests.serve_helpers import ServeProcess

    server = ServeProcess(tiny_model_path, tmp_path_factory.mktemp("serve") / "state", "--max-body-mb", "16")
    server.start()
    saved = {k: os.environ.get(k) for k in server.client_env()}
    os.environ.update(server.client_env())
    yield server
    server.stop()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
