"""learner.backend = "tinker": the learner's TrainingClient over the official tinker SDK
(see backend.py for the whole Tinker path)."""

from __future__ import annotations

import collections
import json
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rlpipe.pipeline.errors import Unrecoverable
from rlpipe.pipeline.tinker.backend import (
    STATE_FILE,
    Done,
    Pending,
    call,
    check_reachable,
    endpoint,
    from_tinker_forward_backward,
    is_tinker_path,
    refused,
    service_client,
    tinker_loss_config,
    to_tinker_datum,
)
from rlpipe.pipeline.tinker.sampler import TinkerSampler
from rlpipe.types import AdamParams, Datum, LoadResponse, LoraConfig, OptimStepResponse, SamplingParams, SaveResponse

log = logging.getLogger(__name__)
KEEP_VERSIONS = 8

class TinkerTrainingClient:
    """The methods of rlpipe.training.client.TrainingClient that the learner uses, over the SDK's
    TrainingClient. The SDK client is made on first use: create_lora_training_client, or,
    when the first call is a load (a resumed learner, learner.init_from),
    create_training_client_from_state[_with_optimizer], as Tinker resumes."""

    def __init__(self, config, lora: LoraConfig, learner_dir: Path):
        self.config = config
        self.base_model = config.model_path()
        self.lora = lora
        self.dir = Path(learner_dir)
        self.timeout_s = config.tinker_timeout_s
        self.where = endpoint(config)
        self.service = service_client(config)
        self.step = 0
        """Optimizer steps taken (Tinker does not say): counted here, restored from STATE_FILE on resume."""
        self._client = None
        self._tokenizer = None
        self._published: collections.deque[str] = collections.deque()

    # ------------------------------------------------------------------ the SDK client

    def _call(self, fn: Callable[[], Any], what: str) -> Any:
        try:
            return call(fn, self.timeout_s, what, self.where)
        except TimeoutError:
            raise
        except Exception as err:
            raise refused(err, what, self.where) from err

    @property
    def client(self):
        if self._client is None:
            check_reachable(self.config)
            lora = self.lora
            self._client = self._call(lambda: self.service.create_lora_training_client(
                base_model=self.base_model, rank=lora.rank, seed=lora.seed, train_mlp=lora.train_mlp,
                train_attn=lora.train_attn, train_unembed=lora.train_unembed).result(),
                f"create_lora_training_client(base_model={self.base_model!r}, rank={lora.rank})")
            log.info("training %s through the Tinker endpoint %s (model %s)", self.base_model, self.where,
                     self._client.model_id)
        return self._client

    def _pending(self, api_future, convert, what: str) -> Pending:
        return Pending(api_future, convert, self.timeout_s, what, self.where)

    # ------------------------------------------------------------------ training

    def forward_backward(self, data: list[Datum], loss_fn: str, loss_fn_config: dict | None = None) -> Pending:
        tinker_data = [to_tinker_datum(d) for d in data]
        return self._pending(self.client.forward_backward(tinker_data, loss_fn, tinker_loss_config(loss_fn_config)),
                             from_tinker_forward_backward, f"forward_backward({loss_fn}) at step {self.step}")

    def forward(self, data: list[Datum], loss_fn: str, loss_fn_config: dict | None = None) -> Pending:
        tinker_data = [to_tinker_datum(d) for d in data]
        return self._pending(self.client.forward(tinker_data, loss_fn, tinker_loss_config(loss_fn_config)),
                             from_tinker_forward_backward, f"forward({loss_fn}) at step {self.step}")

    def optim_step(self, params: AdamParams) -> Pending:
        import tinker

        adam = tinker.types.AdamParams(learning_rate=params.learning_rate, beta1=params.beta1, beta2=params.beta2,
                                       eps=params.eps, weight_decay=params.weight_decay,
                                       grad_clip_norm=params.grad_clip_norm)
        future = self.client.optim_step(adam)
        # The SDK runs a client's requests in order, so the step is counted when it is sent.
        self.step += 1
        step = self.step
        return self._pending(future, lambda out: OptimStepResponse(step=step, metrics={
            k: float(v) for k, v in (getattr(out, "metrics", None) or {}).items()}), f"optim_step {step}")

    # ------------------------------------------------------------------ weights

    def save_weights_for_sampler(self, name: str) -> Pending:
        def saved(out) -> SaveResponse:
            self._published.append(out.path)
            self._drop_old_versions()
            return SaveResponse(path=out.path)

        return self._pending(self.client.save_weights_for_sampler(name), saved, f"save_weights_for_sampler({name!r})")

    def _drop_old_versions(self) -> None:
        """Each published version is a checkpoint on the endpoint: all but the newest
        KEEP_VERSIONS are deleted (explorers sample within max_staleness of the newest), so
        they do not pile up. Best effort: a failure is logged, and tried again next time."""
        if len(self._published) <= KEEP_VERSIONS:
            return
        rest = self.service.create_rest_client()
        while len(self._published) > KEEP_VERSIONS:
            path = self._published[0]
            try:
                self._call(lambda p=path: rest.delete_checkpoint_from_tinker_path(p).result(), f"delete {path}")
            except Exception as err:  # noqa: BLE001  (an old version staying is not worth failing a run)
                log.warning("could not delete %s on the Tinker endpoint: %s: %s", path, type(err).__name__, err)
                return
            self._published.popleft()

    def save_state(self, name: str) -> Pending:
        step = self.step

        def saved(out) -> SaveResponse:
            self._record(out.path, step)
            return SaveResponse(path=out.path)

        return self._pending(self.client.save_state(name), saved, f"save_state({name!r})")

    def load_state_with_optimizer(self, path: str) -> Done:
        return self._load(path, optimizer=True)

    def load_state(self, path: str) -> Done:
        """Weights only (learner.init_from): the optimizer starts fresh and the step counter is kept."""
        return self._load(path, optimizer=False)

    def _load(self, path: str, optimizer: bool) -> Done:
        if not is_tinker_path(path):
            raise Unrecoverable(f"learner.backend = \"tinker\" loads only tinker:// checkpoints, got {path!r}")
        what = f"load {'state with optimizer' if optimizer else 'weights'} from {path}"
        if self._client is None:  # as Tinker resumes: a new training client from the checkpoint
            check_reachable(self.config)
            create = (self.service.create_training_client_from_state_with_optimizer if optimizer
                      else self.service.create_training_client_from_state)
            self._client = self._call(lambda: create(path).result(), what)
        else:
            load = self._client.load_state_with_optimizer if optimizer else self._client.load_state
            self._call(lambda: load(path).result(), what)
        if optimizer:
            self.step = self._recorded_step(path)
        log.info("%s: model %s at step %d", what, self._client.model_id, self.step)
        return Done(LoadResponse(path=path, step=self.step))

    def prune_states(self, keep_newest: int, keep: str) -> list[str]:
        """Delete (on the endpoint) all but the newest keep_newest checkpoints this run saved;
        `keep` (the one just saved) always stays. Best effort: a failure is logged."""
        if keep_newest <= 0:
            return []
        state = self._read_state()
        paths = sorted(state["checkpoints"], key=lambda p: state["checkpoints"][p]["saved_at"])
        doomed = [p for p in paths[:-keep_newest] if p != keep]
        if not doomed:
            return []
        try:
            rest = self.service.create_rest_client()
            for path in doomed:
                self._call(lambda p=path: rest.delete_checkpoint_from_tinker_path(p).result(), f"delete {path}")
                state["checkpoints"].pop(path, None)
        except Exception as err:  # noqa: BLE001  (old checkpoints staying is not worth failing a run)
            log.warning("could not delete old checkpoints on the Tinker endpoint: %s: %s", type(err).__name__, err)
        self._write_state(state)
        return doomed

    # ------------------------------------------------------------------ the step record

    def _read_state(self) -> dict:
        try:
            return json.loads((self.dir / STATE_FILE).read_text())
        except FileNotFoundError:
            return {"checkpoints": {}}

    def _write_state(self, state: dict) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        tmp = self.dir / f".{STATE_FILE}.tmp"
        tmp.write_text(json.dumps(state, indent=1))
        os.replace(tmp, self.dir / STATE_FILE)

    def _record(self, path: str, step: int) -> None:
        state = self._read_state()
        state["checkpoints"][path] = {"step": step, "saved_at": time.time()}
        self._write_state(state)

    def _recorded_step(self, path: str) -> int:
        entry = self._read_state()["checkpoints"].get(path)
        if entry is None:
            raise Unrecoverable(f"{path} is not among the checkpoints of this run ({self.dir / STATE_FILE}): "
                                "its step is unknown")
        return int(entry["step"])

    # ------------------------------------------------------------------ the rest

    def get_tokenizer(self):
        """The model's tokenizer from its directory here, as the explorer loads it; the SDK's
        (which loads what the endpoint names) for a model known by another name."""
        if self._tokenizer is None:
            if (Path(self.base_model) / "tokenizer_config.json").exists():
                from transformers import AutoTokenizer

                self._tokenizer = AutoTokenizer.from_pretrained(self.base_model)
            else:
                self._tokenizer = self._call(self.client.get_tokenizer, "get_tokenizer")
        return self._tokenizer

    def greedy_eval(self, sampler_path: str, items, *, max_tokens: int, policy_version: int) -> dict[str, float]:
        """Greedy accuracy of the sampler weights at sampler_path on (prompt, grader) items,
        sampled through the endpoint (what rlpipe.evaluators.greedy_eval does locally)."""
        from rlpipe.evaluators import run_sampling_eval

        client = self._call(lambda: self.service.create_sampling_client(model_path=sampler_path).result(),
                            f"create_sampling_client(model_path={sampler_path!r})")
        sampler = TinkerSampler(client, policy_version, self.timeout_s, self.where)
        tokenizer = self.get_tokenizer()
        return run_sampling_eval(sampler, items, SamplingParams(max_tokens=max_tokens, temperature=0.0),
                                 decode=lambda tokens: tokenizer.decode(tokens, skip_special_tokens=True))

    def close(self) -> None:
        """Finish the SDK session (best effort, bounded)."""
        try:
            call(lambda: self.service.close("success").result(), 10.0, "close the session", self.where)
        except Exception as err:  # noqa: BLE001
            log.warning("could not close the Tinker session: %s: %s", type(err).__name__, err)
