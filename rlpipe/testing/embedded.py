"""The embedded default model: a tiny Llama-architecture LM with its own tokenizer.

Nothing is downloaded. A byte-level BPE tokenizer is trained on generated text, a small
LlamaForCausalLM is built from a config and pre-trained briefly on the same text, and the
result is an ordinary Hugging Face directory (config.json, model.safetensors, tokenizer.json
with a chat template), so every code path treats it like a user's model.

The default settings' result ships with the package (embedded_model/, 1.9 MB) rather than being
built on each machine: pre-training is chaotic in the float rounding of the processor's kernels.
The same recipe on the same machine with torch's AVX2 kernels instead of its AVX-512 ones
(ATEN_CPU_CAPABILITY=avx2) moves weights by up to 0.15 after its 150 steps, and pre-training in
float64 moves them as much (0.12), so neither a fixed thread count nor float64 makes the build
identical across processors; every learning figure downstream then differed from machine to
machine. Shipped, the demo, the recipes and the tests start from the same weights everywhere.
`python -m rlpipe.testing.embedded OUT_DIR` runs the recipe again (to change it, rebuild, copy the
files into embedded_model/ and update WEIGHTS_SHA256). Other settings (default_model_path(**overrides),
used for test models of other sizes) are still built locally and cached.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import random
import shutil
import tempfile
from pathlib import Path

SPECIAL_TOKENS = ["<|pad|>", "<|end|>", "<|system|>", "<|user|>", "<|assistant|>", "<|tool|>"]
EOS_TOKEN = "<|end|>"
PAD_TOKEN = "<|pad|>"

# One turn is "<|role|>content<|end|>"; EOS ends every turn, so sampling an assistant
# turn stops at the end of the turn and multi-turn histories stay token-exact.
CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>{{ message['content'] }}<|end|>"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)

DEFAULTS = dict(
    vocab_size=384,
    hidden_size=128,
    intermediate_size=384,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=1024,
    train_steps=150,
    seed=0,
)
VERSION = 1  # bump when the corpus or recipe changes, so caches rebuild


def corpus(n: int, seed: int) -> list[str]:
    """Generated text: arithmetic, counting and chat turns, enough for the tokenizer and
    a brief pre-training that teaches digits, operators and the turn structure."""
    rng = random.Random(seed)
    words = "the a is of and to in answer number sum plus minus times what question result".split()
    out = []
    for _ in range(n):
        a, b = rng.randint(0, 99), rng.randint(0, 99)
        op = rng.choice("+-*")
        value = eval(f"{a}{op}{b}")
        kind = rng.random()
        if kind < 0.4:
            out.append(f"{a} {op} {b} = {value}")
        elif kind < 0.6:
            start = rng.randint(0, 90)
            out.append(" ".join(str(start + i) for i in range(rng.randint(3, 8))))
        elif kind < 0.8:
            out.append(" ".join(rng.choice(words) for _ in range(rng.randint(4, 12))))
        else:
            out.append(
                f"<|user|>What is {a} {op} {b}?<|end|><|assistant|>{rng.choice(words)} {value}<|end|>"
            )
    return out


def train_tokenizer(
    texts: list[str],
    vocab_size: int,
    special_tokens: list[str] = SPECIAL_TOKENS,
    *,
    eos_token: str | None = EOS_TOKEN,
    pad_token: str | None = PAD_TOKEN,
    bos_token: str | None = None,
    unk_token: str | None = None,
    add_bos_token: bool = False,
    chat_template: str = CHAT_TEMPLATE,
):
    """A byte-level BPE tokenizer trained on texts, with special_tokens first (ids 0, 1, ...).

    The defaults make the embedded model's tokenizer; rlpipe.testing.families passes a model family's
    special tokens, roles (eos/pad/bos/unk) and chat template. add_bos_token: prepend bos_token
    on every encode, as Llama-3, Mistral and Gemma tokenizers do."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    # Single digits keep numbers compositional: arithmetic rewards then depend on the
    # model, not on which numbers happened to get merged into one token.
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special_tokens,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    # Only the roles that are set are passed, so the embedded model's files stay byte-identical.
    roles = dict(eos_token=eos_token, pad_token=pad_token, bos_token=bos_token, unk_token=unk_token)
    roles = {k: v for k, v in roles.items() if v is not None}
    if add_bos_token:
        roles["add_bos_token"] = True
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, **roles)
    fast.chat_template = chat_template
    return fast


def build_tiny_model(out_dir: str | os.PathLike, **overrides) -> Path:
    """Train a tokenizer, build and briefly pre-train a tiny Llama, save it to out_dir."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = {**DEFAULTS, **overrides}
    unknown = set(cfg) - set(DEFAULTS)
    if unknown:
        raise ValueError(f"unknown tiny-model settings: {sorted(unknown)}")
    texts = corpus(4000, cfg["seed"])
    tokenizer = train_tokenizer(texts, cfg["vocab_size"])
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=cfg["hidden_size"],
        intermediate_size=cfg["intermediate_size"],
        num_hidden_layers=cfg["num_hidden_layers"],
        num_attention_heads=cfg["num_attention_heads"],
        num_key_value_heads=cfg["num_key_value_heads"],
        max_position_embeddings=cfg["max_position_embeddings"],
        tie_word_embeddings=False,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
        torch_dtype="float32",
    )
    torch.manual_seed(cfg["seed"])
    model = LlamaForCausalLM(config)
    pretrain(model, tokenizer, texts, cfg["train_steps"], cfg["seed"])
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    (out / "rlpipe_tiny.json").write_text(json.dumps({"version": VERSION, **cfg}, indent=1))
    return out


def pretrain(model, tokenizer, texts: list[str], steps: int, seed: int) -> None:
    ids = [tokenizer(t)["input_ids"] + [tokenizer.eos_token_id] for t in texts]
    pretrain_on_ids(model, ids, tokenizer.pad_token_id, steps, seed)


def pretrain_on_ids(model, ids: list[list[int]], pad_id: int, steps: int, seed: int) -> None:
    """A few AdamW steps of next-token prediction on random batches of 32 token sequences
    (pad_id only fills the right of a row; it is never a target)."""
    import torch

    rng = random.Random(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(steps):
        batch = rng.sample(ids, 32)
        width = max(map(len, batch))
        input_ids = torch.full((len(batch), width), pad_id)
        labels = torch.full((len(batch), width), -100)
        for i, seq in enumerate(batch):
            input_ids[i, : len(seq)] = torch.tensor(seq)
            labels[i, : len(seq)] = torch.tensor(seq)
        loss = model(input_ids=input_ids, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()


def cache_dir() -> Path:
    return Path(os.environ.get("RLPIPE_CACHE", Path.home() / ".cache" / "rlpipe"))


EMBEDDED_DIR = Path(__file__).resolve().parent / "embedded_model"
WEIGHTS_SHA256 = "b0103aa31a9b4340454c52c982fd34d7bdf925f6b9f4daa307f7a3f468c0feaf"
"""sha256 of embedded_model/model.safetensors: build_tiny_model() with DEFAULTS on an AMD EPYC
(AVX-512 kernels), torch 2.13.0+cpu, 2 threads, on 2026-12-07."""


def default_model_path(**overrides) -> Path:
    """The embedded default model (the shipped files); with overrides of DEFAULTS, a model of
    other settings, built once per machine and settings by the same recipe, then reused."""
    if not {k: v for k, v in overrides.items() if DEFAULTS.get(k, v) != v or k not in DEFAULTS}:
        if not (EMBEDDED_DIR / "model.safetensors").exists():
            raise FileNotFoundError(f"the embedded model's files are missing from {EMBEDDED_DIR}: reinstall rlpipe")
        return EMBEDDED_DIR
    cfg = {**DEFAULTS, **overrides, "version": VERSION}
    return cached_build("tiny-llama", cfg, lambda out: build_tiny_model(out, **overrides))


def cached_build(prefix: str, key: dict, build) -> Path:
    """cache_dir()/prefix-<digest of key>, made by build(directory) on first use.

    A file lock makes concurrent callers (pytest workers, roles of one run) wait for one
    build instead of racing; the directory appears atomically by rename."""
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:10]
    root = cache_dir()
    root.mkdir(parents=True, exist_ok=True)
    path = root / f"{prefix}-{digest}"
    if (path / "config.json").exists():
        return path
    with open(root / f".{path.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (path / "config.json").exists():
            tmp = Path(tempfile.mkdtemp(dir=root, prefix=".build-"))
            try:
                build(tmp)
                os.rename(tmp, path)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
    return path


if __name__ == "__main__":
    import sys

    if len(sys.argv) != 2:
        raise SystemExit("usage: python -m rlpipe.testing.embedded OUT_DIR   (runs the embedded model's recipe)")
    out = build_tiny_model(sys.argv[1])
    digest = hashlib.sha256((out / "model.safetensors").read_bytes()).hexdigest()
    print(f"{out}: model.safetensors sha256 {digest} ({'the shipped weights' if digest == WEIGHTS_SHA256 else 'differs from the shipped weights'})")
