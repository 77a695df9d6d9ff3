"""Adapter directories and loaded versions: checks, engine-owned snapshots, the version table.

Shared by both backends. An adapter is checked (a PEFT LoRA directory whose modules fit the
base model) before any engine sees it, so a bad directory is a clear FileNotFoundError /
ValueError and never an engine crash.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import threading
from pathlib import Path

from rlpipe.sampling.errors import AdapterEvictedError


@dataclasses.dataclass(eq=False)
class Adapter:
    """One loaded LoRA version: an engine-owned snapshot of the directory it came from, so
    a learner overwriting its directory can never change the weights of a loaded version."""

    key: int  # unique per engine: the vLLM LoRA int id / peft adapter name
    version: int
    source: str
    path: str
    digest: str
    rank: int
    in_flight: int = 0
    evicted: bool = False

    @property
    def name(self) -> str:
        return f"rlpipe-{self.key}-v{self.version}"


def check_adapter(source: str, max_rank: int | None = None, base_shapes: dict[str, list[int]] | None = None) -> int:
    """Check that source is a PEFT LoRA directory an engine can load; returns its rank.

    base_shapes (base_weight_shapes) also checks that every LoRA module exists in the base
    model with matching in/out sizes. Raises FileNotFoundError / ValueError naming the
    problem, before any engine sees the adapter."""
    from safetensors import safe_open

    src = Path(source)
    if not src.exists():
        raise FileNotFoundError(f"adapter directory {source!r} does not exist")
    if not src.is_dir():
        raise ValueError(f"adapter path {source!r} is not a directory")
    config_file, weights_file = src / "adapter_config.json", src / "adapter_model.safetensors"
    for f in (config_file, weights_file):
        if not f.is_file():
            raise FileNotFoundError(f"adapter directory {source!r} has no {f.name} (is it a PEFT adapter from save_weights_for_sampler?)")
    try:
        config = json.loads(config_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{config_file} is not valid JSON: {e}") from None
    if not isinstance(config, dict) or config.get("peft_type") != "LORA":
        raise ValueError(f"{config_file}: peft_type must be 'LORA', got {config.get('peft_type') if isinstance(config, dict) else config!r}")
    rank = config.get("r")
    if not isinstance(rank, int) or rank < 1:
        raise ValueError(f"{config_file}: LoRA rank r must be a positive int, got {rank!r}")
    ranks = [rank, *(config.get("rank_pattern") or {}).values()]
    if max_rank is not None and max(ranks) > max_rank:
        raise ValueError(f"adapter {source!r} has LoRA rank {max(ranks)} > the engine's max_lora_rank {max_rank}")
    if config.get("use_dora"):
        raise ValueError(f"adapter {source!r} is a DoRA adapter; only plain LoRA is supported")
    try:
        with safe_open(str(weights_file), "pt") as f:
            shapes = {n: f.get_slice(n).get_shape() for n in f.keys()}
    except Exception as e:  # safetensors raises several types for a corrupt header
        raise ValueError(f"{weights_file} is not a readable safetensors file: {e}") from None
    lora = {n: shape for n, shape in shapes.items() if n.endswith((".lora_A.weight", ".lora_B.weight"))}
    if not any(n.endswith("lora_A.weight") for n in lora) or not any(n.endswith("lora_B.weight") for n in lora):
        raise ValueError(f"{weights_file} holds no LoRA weights (lora_A / lora_B)")
    if not config.get("rank_pattern"):
        a_ranks = {shape[0] for n, shape in lora.items() if n.endswith("lora_A.weight")}
        if a_ranks != {rank}:
            raise ValueError(f"{weights_file}: lora_A ranks {sorted(a_ranks)} do not match r={rank} in adapter_config.json")
    if base_shapes is not None:
        for name, shape in lora.items():
            module = name.removeprefix("base_model.model.").rsplit(".", 2)[0]
            base = base_shapes.get(module + ".weight")
            if base is None or len(base) != 2:
                raise ValueError(f"adapter {source!r} has LoRA weights for {module!r}, which is not a linear layer of the base model")
            out_features, in_features = base
            got, want = (shape[1], in_features) if ".lora_A." in name else (shape[0], out_features)
            if got != want:
                raise ValueError(
                    f"adapter {source!r} does not fit the base model: {name} has size {got} where "
                    f"{module} needs {want} (was it trained on another base model?)"
                )
    return rank


def base_weight_shapes(base_model: str) -> dict[str, list[int]] | None:
    """Shapes of the base model's weights by name, read from its safetensors headers
    (None for a checkpoint without safetensors: adapter shapes are then left to the engine)."""
    from safetensors import safe_open

    if not (Path(base_model) / "config.json").is_file():
        raise FileNotFoundError(f"base_model {base_model!r} is not a local Hugging Face model directory (no config.json)")
    files = sorted(Path(base_model).glob("*.safetensors"))
    if not files:
        return None
    shapes: dict[str, list[int]] = {}
    for file in files:
        with safe_open(str(file), "pt") as f:
            shapes.update({n: f.get_slice(n).get_shape() for n in f.keys()})
    if "lm_head.weight" not in shapes:
        # Tied embeddings: the checkpoint stores only the input embedding, but lm_head is still
        # a linear layer (sharing that weight) that LoRA may target; peft and vLLM both load it.
        embed = next((shape for n, shape in shapes.items() if n.endswith("embed_tokens.weight")), None)
        if embed is not None:
            shapes["lm_head.weight"] = embed
    return shapes


def snapshot_adapter(source: str, dest_root: Path, key: int, version: int, max_rank: int | None,
                     base_shapes: dict[str, list[int]] | None = None) -> Adapter:
    """Check a PEFT LoRA directory (check_adapter) and copy it into dest_root (engine-owned)."""
    rank = check_adapter(source, max_rank, base_shapes)
    src = Path(source)
    dest = dest_root / f"{key:06d}-v{version}"
    dest.mkdir(parents=True)
    digest = hashlib.sha256()
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        shutil.copyfile(src / name, dest / name)
        digest.update(name.encode())
        digest.update((dest / name).read_bytes())
    return Adapter(key=key, version=version, source=str(source), path=str(dest), digest=digest.hexdigest(), rank=rank)


class AdapterTable:
    """The loaded adapter versions of one engine, with their in-flight request counts.

    The newest `capacity` versions stay loaded; older ones are evicted once idle (a version
    with requests in flight never is, it lingers until they finish). A load whose content and version match a
    loaded one reuses it. Thread-safe: clients acquire from their threads, engines release
    from theirs."""

    def __init__(self, capacity: int):
        if capacity < 1:
            raise ValueError(f"max_loaded_adapters must be >= 1, got {capacity}")
        self.capacity = capacity
        self._loaded: list[Adapter] = []  # oldest first
        self._lock = threading.Lock()

    def find(self, version: int, digest: str) -> Adapter | None:
        with self._lock:
            return next((a for a in self._loaded if a.version == version and a.digest == digest), None)

    def add(self, adapter: Adapter) -> list[Adapter]:
        with self._lock:
            self._loaded.append(adapter)
            return self._evictable()

    def acquire(self, adapter: Adapter) -> None:
        with self._lock:
            if adapter.evicted:
                raise AdapterEvictedError(
                    f"adapter version {adapter.version} ({adapter.source}) was evicted: only the newest "
                    f"{self.capacity} versions stay loaded (max_loaded_adapters); sample with a newer version"
                )
            adapter.in_flight += 1

    def release(self, adapter: Adapter) -> list[Adapter]:
        with self._lock:
            adapter.in_flight -= 1
            return self._evictable()

    def loaded(self) -> list[Adapter]:
        with self._lock:
            return list(self._loaded)

    def _evictable(self) -> list[Adapter]:
        """Versions older than the newest `capacity` ones, once idle (busy ones linger)."""
        out = [a for a in self._loaded[: max(0, len(self._loaded) - self.capacity)] if a.in_flight == 0]
        for a in out:
            a.evicted = True
            self._loaded.remove(a)
        return out


def write_zero_adapter(dest: Path, base_model: str, base_shapes: dict[str, list[int]] | None) -> Path:
    """A rank-1 PEFT LoRA on one linear layer of base_model whose delta is exactly zero."""
    import torch
    from safetensors.torch import save_file

    linear = ("q_proj", "o_proj", "down_proj", "up_proj", "gate_proj", "k_proj", "v_proj", "lm_head")
    if base_shapes is None:  # no safetensors to read: a Llama-style q_proj from the config
        cfg = json.loads((Path(base_model) / "config.json").read_text())
        head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
        base_shapes = {"model.layers.0.self_attn.q_proj.weight": [cfg["num_attention_heads"] * head_dim, cfg["hidden_size"]]}
    def leaf(name: str) -> str:
        return name.rsplit(".", 2)[-2]

    # Preference order, lm_head last: vLLM serves LoRA on lm_head only for some model classes
    # (Llama, Qwen3; not Qwen2, Mistral or Gemma), and an untied checkpoint lists lm_head first.
    name, (out_features, in_features) = min(
        ((n, shape) for n, shape in base_shapes.items()
         if len(shape) == 2 and n.endswith(".weight") and leaf(n) in linear),
        key=lambda item: linear.index(leaf(item[0])),
    )
    module = name.removesuffix(".weight")
    dest.mkdir(parents=True)
    (dest / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": 1, "lora_alpha": 1, "target_modules": [module.rsplit(".", 1)[-1]],
        "base_model_name_or_path": str(base_model), "bias": "none",
    }))
    save_file({f"base_model.model.{module}.lora_A.weight": torch.zeros(1, in_features),
               f"base_model.model.{module}.lora_B.weight": torch.zeros(out_features, 1)},
              str(dest / "adapter_model.safetensors"))
    return dest
