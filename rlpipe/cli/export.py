"""`rlpipe export`: a run's learner checkpoint as a model other tools load.

    rlpipe export runs/arith --merged out/arith          # plain Hugging Face model, LoRA merged in
    rlpipe export runs/arith --step 20 --peft out/lora   # the PEFT adapter alone, on the run's base

The checkpoint is RUN_DIR/learner/state/step-NNNNNN/ (the learner's save_state); the default
is the one learner/latest.json names, the learner's last complete checkpoint. The base model
is the run's (RUN_DIR/config.json). Output appears all at once: it is written to a temporary
directory next to OUT and renamed, so a failed export leaves no half-written model behind.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import warnings
from contextlib import contextmanager
from pathlib import Path

from rlpipe.training import checkpoint

log = logging.getLogger(__name__)
STEP_PREFIX = "step-"


class ExportError(ValueError):
    """A run directory, step or output path that cannot be exported as asked."""


def checkpoints(run_dir: str | Path) -> dict[int, Path]:
    """{step: state directory} of the run's complete learner checkpoints (rlpipe_state.json is
    written last by save_state, so a directory without it was cut short)."""
    state = Path(run_dir) / "learner" / "state"
    found = {}
    for path in state.glob(f"{STEP_PREFIX}*") if state.is_dir() else []:
        number = path.name.removeprefix(STEP_PREFIX)
        if number.isdigit() and (path / checkpoint.STATE_FILE).is_file():
            found[int(number)] = path
    return dict(sorted(found.items()))


def find_checkpoint(run_dir: str | Path, step: int | None = None) -> tuple[Path, str]:
    """(state directory, base model directory) of the run's checkpoint at step, default the
    newest. Raises ExportError saying what is missing."""
    from rlpipe.pipeline.config import load
    from rlpipe.pipeline.learner import latest_checkpoint

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ExportError(f"run directory {run_dir} does not exist")
    if not (run_dir / "config.json").is_file():
        raise ExportError(f"{run_dir} has no config.json, so it is not an rlpipe run directory")
    try:
        # The run writes its config with the API key as "***", which the check would refuse.
        config = load(run_dir / "config.json", {"tinker_api_key": ""})
    except ValueError as err:
        raise ExportError(f"cannot read the run's config: {err}") from None
    if config.learner.backend == "tinker":
        raise ExportError(f"{run_dir} trained on a Tinker endpoint: its checkpoints are tinker:// paths there, "
                          "not on this machine")

    found = checkpoints(run_dir)
    if not found:
        raise ExportError(f"{run_dir} has no learner checkpoints yet (learner/state/{STEP_PREFIX}NNNNNN)")
    if step is None:
        try:
            latest = latest_checkpoint(run_dir)
        except ValueError as err:
            raise ExportError(f"{run_dir}/learner/latest.json is unreadable ({err}): pass --step") from None
        # By step, not by the recorded path: the run directory may have moved since.
        step = max(found) if latest is None else int(latest["step"])
    if step not in found:
        raise ExportError(f"{run_dir} has no checkpoint for step {step}; available steps: "
                          f"{', '.join(map(str, found))} (older ones are pruned, see learner.keep_checkpoints)")
    path = found[step]
    try:
        meta = checkpoint.read_meta(path)
    except (ValueError, FileNotFoundError) as err:
        raise ExportError(str(err)) from None

    base = config.model_path()
    if not (Path(base) / "config.json").is_file():
        raise ExportError(f"the run's base model {base!r} is not a local Hugging Face model directory")
    if os.path.realpath(base) != os.path.realpath(meta.base_model):
        log.warning("checkpoint %s was trained on %s; exporting onto the run's base %s", path, meta.base_model, base)
    return path, base


def export_peft(run_dir: str | Path, out: str | Path, step: int | None = None) -> Path:
    """Write the checkpoint's LoRA adapter to out (adapter_config.json + adapter_model.safetensors,
    base_model_name_or_path = the run's base), loadable with peft's PeftModel.from_pretrained."""
    path, base = find_checkpoint(run_dir, step)
    adapter = path / "adapter"
    config = json.loads((adapter / checkpoint.ADAPTER_CONFIG).read_text())
    config["base_model_name_or_path"] = os.path.abspath(base)
    with _output_dir(out) as tmp:
        (tmp / checkpoint.ADAPTER_CONFIG).write_text(json.dumps(config, indent=2))
        shutil.copyfile(adapter / checkpoint.ADAPTER_WEIGHTS, tmp / checkpoint.ADAPTER_WEIGHTS)
    log.info("exported the adapter of %s to %s", path, out)
    return Path(out)


def export_merged(run_dir: str | Path, out: str | Path, step: int | None = None) -> Path:
    """Write base + the checkpoint's LoRA, merged, to out as a plain Hugging Face model (weights,
    config, generation config, tokenizer) in the base's dtype.

    A base whose lm_head shares its weight with the input embedding (tie_word_embeddings) and an
    adapter on lm_head: merging would add the lm_head delta to the embedding too, so the output
    gets a separate lm_head and tie_word_embeddings false, and the embedding stays the base's."""
    import torch
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from rlpipe.training.lora import tied_embeddings

    path, base = find_checkpoint(run_dir, step)
    _check_out(out)  # before the (possibly long) merge
    dtype = getattr(AutoConfig.from_pretrained(base), "dtype", None) or torch.float32
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    # Merged in float32 and rounded once to the base's dtype: closer to base + adapter than
    # adding a rounded delta to rounded weights.
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    tied = tied_embeddings(model)
    with warnings.catch_warnings():
        # peft warns about LoRA on a tied lm_head, and that merging unties it; untying first is
        # what it asks for.
        warnings.filterwarnings("ignore", message=".*(tie_word_embeddings|no longer tied).*")
        model = PeftModel.from_pretrained(model, path / "adapter")
        head = model.get_output_embeddings()
        untie = tied and isinstance(head, LoraLayer)
        if untie:
            layer = head.get_base_layer()
            layer.weight = torch.nn.Parameter(layer.weight.detach().clone(), requires_grad=False)
            log.info("%s ties its embeddings and the adapter trains lm_head: the export gets its own lm_head", base)
        merged = model.merge_and_unload(safe_merge=True)  # safe_merge: refuse NaN weights
    if untie:  # or loading the export would tie lm_head back to the embedding
        merged.config.tie_word_embeddings = False
        merged.config.get_text_config().tie_word_embeddings = False
    merged.to(dtype)
    tokenizer = AutoTokenizer.from_pretrained(base)
    with _output_dir(out) as tmp:
        merged.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    log.info("exported %s merged into %s to %s", path, base, out)
    return Path(out)


def _check_out(out: str | Path) -> None:
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ExportError(f"{out} already exists and is not empty: choose another output or remove it")


@contextmanager
def _output_dir(out: str | Path):
    """A temporary directory next to out, renamed to out when the block succeeds."""
    out = Path(out)
    _check_out(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        yield tmp
        if out.exists():
            out.rmdir()  # empty (checked above); os.replace would refuse a non-empty one anyway
        umask = os.umask(0)
        os.umask(umask)
        tmp.chmod(0o777 & ~umask)  # mkdtemp's 0700 would keep the model from other accounts (a vLLM server)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main(args) -> None:
    """The CLI: args.run_dir, args.step (None = newest), exactly one of args.merged / args.peft."""
    if (args.merged is None) == (args.peft is None):
        raise SystemExit("rlpipe export: give exactly one of --merged OUT or --peft OUT")
    try:
        if args.merged is not None:
            out = export_merged(args.run_dir, args.merged, args.step)
        else:
            out = export_peft(args.run_dir, args.peft, args.step)
    except ExportError as err:
        raise SystemExit(f"rlpipe export: {err}") from None
    print(f"rlpipe export: wrote {out}")
