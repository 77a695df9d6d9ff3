"""learner.backend = "tinker": the learner's client over the official tinker SDK (see
backend.py for the whole Tinker path; pipeline/local_training.py lists what the learner calls).

Here the WeightUpdate carries the tinker:// path of save_weights_for_sampler instead of the
adapter's bytes, checkpoints are tinker:// paths on the endpoint, and evaluation samples there."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rlpipe.pipeline.errors import Unrecoverable
from rlpipe.pipeline.tinker.backend import (
    STATE_FILE,
    Done,
    Pending,
    INFLIGHT,
    call,
    check_reachable,
    endpoint,
    is_tinker_path,
    refused,
    service_client,
    tinker_loss_config,
    weight_updates,
)
from rlpipe.pipeline.tinker.sampler import TinkerSamplingClient
from rlpipe.training.checkpoint import pruned, write_json_atomic
from rlpipe.training.sdk import from_tinker_forward_backward, to_tinker_adam, to_tinker_datum
from rlpipe.types import AdamParams, Datum, LoadResponse, LoraConfig, OptimStepResponse, SamplingParams, SaveResponse

log = logging.getLogger(__name__)


class TinkerTrainingClient:
    """What the learner calls on its client, over the SDK's TrainingClient. The SDK client is
    made on first use: create_lora_training_client, or, when the first call is a load (a
    resumed learner, learner.init_from), create_training_client_from_state[_with_optimizer],
    as Tinker resumes."""

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
        self._published: list[str] = []  # tinker:// paths, oldest first
        self._evals: list[str] = []
        self.keep_versions = config.max_staleness + 2
        """Published versions kept on the endpoint; older ones are deleted. An explorer samples
        with the newest version it has; a group it started with version v is trainable while the
        learner is at most max_staleness versions past v, so the versions the next batches can
        hold are the newest max_staleness + 1; one more stays for the explorers still finishing
        groups with the version before those while the newest WeightUpdate is on its way to them
        (their samples would fail on a deleted version and count as an engine death).
        The explorer's engine keeps as many loaded (explorer_sampler.engine_options)."""

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
        future = self.client.optim_step(to_tinker_adam(params))
        # The SDK runs a client's requests in order, so the step is counted when it is sent.
        self.step += 1
        step = self.step
        return self._pending(future, lambda out: OptimStepResponse(step=step, metrics={
            k: float(v) for k, v in (getattr(out, "metrics", None) or {}).items()}), f"optim_step {step}")

    # ------------------------------------------------------------------ weights

    def save_weights_for_sampler(self, name: str) -> Pending:
        return self._pending(self.client.save_weights_for_sampler(name), lambda out: SaveResponse(path=out.path),
                             f"save_weights_for_sampler({name!r})")

    def publish(self, version: int) -> Pending:
        """A future of the WeightUpdate field of version `version`: its sampler weights' tinker://
        path (save_weights_for_sampler, after the calls made so far)."""
        def saved(out) -> dict[str, str]:
            self._published.append(out.path)
            self._forget(self._published, self._delete(self._published, self.keep_versions, out.path))
            return {"sampler_path": out.path}

        if weight_updates(self.config) == "inflight":
            # One shared, mutable target on the endpoint: this save moves it for the explorers'
            # current clients too; the handle is for explorers that have none yet (or restarted).
            return self._pending(self.client.save_weights_and_get_sampling_client(kind="inflight"),
                                 lambda sc: {"sampler_path": INFLIGHT + sc.get_sampler_handle()},
                                 f"save_weights_and_get_sampling_client(kind=\"inflight\") for version {version}")
        name = f"v{version:06d}"
        return self._pending(self.client.save_weights_for_sampler(name), saved, f"save_weights_for_sampler({name!r})")

    def _delete(self, paths: list[str], keep_newest: int, keep: str) -> list[str]:
        """Delete on the endpoint what checkpoint.pruned names of paths (oldest first), so they
        do not pile up; returns those deleted. Best effort: a failure is logged, and the rest
        tried again next time."""
        deleted, rest = [], None
        for path in pruned(paths, keep_newest, keep):
            try:
                rest = rest or self.service.create_rest_client()
                self._call(lambda p=path: rest.delete_checkpoint_from_tinker_path(p).result(), f"delete {path}")
            except Exception as err:  # noqa: BLE001  (an old version staying is not worth failing a run)
                log.warning("could not delete %s on the Tinker endpoint: %s: %s", path, type(err).__name__, err)
                break
            deleted.append(path)
        return deleted

    @staticmethod
    def _forget(paths: list[str], deleted: list[str]) -> None:
        paths[:] = [p for p in paths if p not in deleted]

    def save_state(self, name: str) -> Pending:
        step = self.step

        def saved(out) -> SaveResponse:
            self._record(out.path, step)
            return SaveResponse(path=out.path)

        return self._pending(self.client.save_state(name), saved, f"save_state({name!r})")

    def start_from(self, path: str | None, with_optimizer: bool) -> None:
        if path is not None:
            self._load(path, optimizer=with_optimizer)

    def checkpoint(self, name: str) -> str:
        return self.save_state(name).result().path  # the endpoint's to keep durable

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

    def prune_checkpoints(self, keep_newest: int, keep: str) -> list[str]:
        """Delete (on the endpoint) the checkpoints this run saved that checkpoint.pruned names
        (by the time they were saved). Best effort: a failure is logged."""
        state = self._read_state()
        deleted = self._delete(sorted(state["checkpoints"], key=lambda p: state["checkpoints"][p]["saved_at"]),
                               keep_newest, keep)
        for path in deleted:
            del state["checkpoints"][path]
        if deleted:
            self._write_state(state)
        return deleted

    # ------------------------------------------------------------------ the step record

    def _read_state(self) -> dict:
        try:
            return json.loads((self.dir / STATE_FILE).read_text())
        except FileNotFoundError:
            return {"checkpoints": {}}

    def _write_state(self, state: dict) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        write_json_atomic(self.dir / STATE_FILE, state, indent=1)

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

    def evaluate(self, step: int, items) -> dict[str, float]:
        """Greedy accuracy of the current weights on (prompt, grader) items, sampled through
        the endpoint (what rlpipe.evaluators.greedy_eval does locally); the newest
        learner.keep_checkpoints evaluation weights stay there."""
        path = self.save_weights_for_sampler(f"eval-{step:06d}").result().path
        self._evals.append(path)
        self._forget(self._evals, self._delete(self._evals, self.config.learner.keep_checkpoints, path))
        return self.greedy_eval(path, items, max_tokens=self.config.explorer.max_tokens, policy_version=step)

    def greedy_eval(self, sampler_path: str, items, *, max_tokens: int, policy_version: int) -> dict[str, float]:
        """Greedy accuracy of the sampler weights at sampler_path on (prompt, grader) items."""
        from rlpipe.evaluators import run_sampling_eval

        client = self._call(lambda: self.service.create_sampling_client(model_path=sampler_path).result(),
                            f"create_sampling_client(model_path={sampler_path!r})")
        sampler = TinkerSamplingClient(client, policy_version, self.timeout_s, self.where)
        tokenizer = self.get_tokenizer()
        return run_sampling_eval(sampler, items, SamplingParams(max_tokens=max_tokens, temperature=0.0),
                                 decode=lambda tokens: tokenizer.decode(tokens, skip_special_tokens=True))

    def close(self) -> None:
        """Finish the SDK session (best effort, bounded)."""
        try:
            call(lambda: self.service.close("success").result(), 10.0, "close the session", self.where)
        except Exception as err:  # noqa: BLE001
            log.warning("could not close the Tinker session: %s: %s", type(err).__name__, err)
