"""The learner role: pull batches from the buffer, train, publish adapters, checkpoint.

    while step < steps:
        batch = buffer.next(groups_per_batch)     # BatchRequest(after_seq = last trained seq)
        for each of optim_steps_per_batch mini-batches: forward_backward(datums); optim_step
        step += 1
        every sync_interval steps: WeightUpdate(version = step, adapter bytes) -> explorers
        every checkpoint_every steps: save_state + the buffer position

With learner.backend = "tinker" the client is the official tinker SDK's on a Tinker endpoint
(rlpipe/pipeline/tinker/backend.py): the WeightUpdate carries the tinker:// sampler path of
save_weights_for_sampler instead of the bytes, and checkpoints are tinker:// paths.

With learner.processes = N (or under torchrun) the learner is N data-parallel ranks: this
class runs on rank 0, the other ranks run follow() (rlpipe/pipeline/distributed.py).

The policy version is the learner's step count (batches trained), kept by the learner apart
from the client's optimizer-step count (several per batch with optim_steps_per_batch > 1), so
"u - v" in the staleness rule, `steps`, sync_interval and checkpoint_every count batches.
"""

from __future__ import annotations

import concurrent.futures
import json
import logging
import os
import shutil
import threading
import time
from pathlib import Path

import msgspec
import torch

from rlpipe.training import checkpoint
from rlpipe.training.hyperparams import get_lr, scheduled_lr
from rlpipe.metrics import MetricsWriter
from rlpipe.pipeline import distributed, identity, transport
from rlpipe.datums import batch_metrics, group_datums, is_truncated, split_groups
from rlpipe.pipeline.config import RunConfig, import_callable, redacted, resolve_train_unembed
from rlpipe.pipeline.errors import Unrecoverable
from rlpipe.training.client import TrainingClient
from rlpipe.types import (
    AdamParams,
    Batch,
    BatchRequest,
    Datum,
    LoraConfig,
    Shutdown,
    TrajectoryGroup,
    WeightUpdate,
)

log = logging.getLogger(__name__)
LATEST = "latest.json"
SHUTDOWN_GRACE_S = 3.0


def latest_checkpoint(run_dir: Path) -> dict | None:
    """The learner's newest checkpoint, {"path", "step", "optim_steps", "after_seq",
    "groups_trained", "incarnation"} (its PEFT adapter is path/adapter; "step" counts learner
    steps, "optim_steps" the optimizer's, absent before optim_steps_per_batch), or None before
    the first one."""
    latest = Path(run_dir) / "learner" / LATEST
    return json.loads(latest.read_text()) if latest.exists() else None


def _lora(config: RunConfig) -> LoraConfig:
    lc = config.learner
    return LoraConfig(rank=lc.rank, seed=config.seed, train_attn=lc.train_attn, train_mlp=lc.train_mlp,
                      train_unembed=resolve_train_unembed(config))


def _join_ranks(config: RunConfig) -> tuple[distributed.Ranks, str]:
    """This process's place among the learner's ranks (before the model: NCCL binds this rank's
    GPU), its device, and its torch threads."""
    lc = config.learner
    device = distributed.rank_device(lc.device)
    ranks = distributed.Ranks(device, lc.dist_timeout_s, lc.strategy)
    if ranks.size > 1 and lc.backend == "tinker":
        raise ValueError('a learner under torchrun needs learner.backend = "local": with "tinker" the endpoint trains')
    threads = lc.cpu_threads
    if not threads and not torch.cuda.is_available():
        # the cores this process may use (taskset, cgroups), shared by the ranks on this host
        threads = max(1, len(os.sched_getaffinity(0)) // 2 // int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    if threads:
        torch.set_num_threads(threads)
    return ranks, device


def _local_client(config: RunConfig, device: str, checkpoint_dir: Path, ranks: distributed.Ranks) -> TrainingClient:
    lc = config.learner
    return TrainingClient(config.model_path(), _lora(config), checkpoint_dir, device=device or None,
                          dtype=lc.dtype or None, layout=lc.layout or None,
                          max_tokens_per_micro_batch=lc.max_tokens_per_micro_batch,
                          gradient_checkpointing=lc.gradient_checkpointing, place=ranks.place)


def follow(config: RunConfig) -> None:
    """A learner rank other than 0 (torchrun): the same model, given rank 0's adapter and
    optimizer state, trained on the shares of each batch that rank 0 sends, until it stops."""
    ranks, device = _join_ranks(config)
    client = _local_client(config, device, config.run_dir / "learner", ranks)
    try:
        ranks.attach(client)
        ranks.follow(client)
    finally:
        client.close()
    ranks.close()


class Learner:
    def __init__(self, config: RunConfig, resume: bool = False):
        self.config = config
        self.dir = config.run_dir / "learner"
        self.ranks, device = _join_ranks(config)
        model = config.model_path()
        lc = config.learner
        self.tinker = lc.backend == "tinker"
        if self.tinker:
            from rlpipe.pipeline.tinker.training import TinkerTrainingClient

            self.client = TinkerTrainingClient(config, _lora(config), self.dir)
        else:
            self.client = _local_client(config, device, self.dir, self.ranks)
        self.step = 0
        """Learner steps (batches trained): the policy version. The client counts optimizer steps."""
        self.after_seq = 0
        self.durable_seq = 0
        """The buffer position of the newest checkpoint: a restart asks again from there."""
        self.groups_trained = 0
        self._stop_fetching = threading.Event()
        self.run_id = identity.run_id(config.run_dir)
        self.incarnation = identity.next_incarnation(self.dir)
        latest = latest_checkpoint(config.run_dir) if resume else None
        if latest is not None:
            self.client.load_state_with_optimizer(latest["path"]).result()
            self.step = latest["step"]
            self.after_seq = self.durable_seq = latest["after_seq"]
            self.groups_trained = latest.get("groups_trained", 0)
            log.info("resumed at step %d (%d optimizer steps), buffer position %d", self.step, self.client.step,
                     self.after_seq)
        elif config.learner.init_from:
            self.client.load_state(config.learner.init_from).result()
        self.ranks.attach(self.client)  # the other ranks start from this rank's adapter and optimizer state
        log.info("learner incarnation %d of run %s", self.incarnation, self.run_id)
        self.lr = config.learner.learning_rate or get_lr(model)
        """The peak learning rate; each step's is scheduled_lr (learner.lr_schedule)."""
        self.loss_config = {**config.learner.loss_fn_config, "temperature": config.explorer.temperature}
        if lc.kl_coef > 0:
            self.loss_config["kl_coef"] = lc.kl_coef
        self.metrics = MetricsWriter(config.run_dir / "metrics.jsonl", logging=config.logging, run_name=config.name,
                                     run_id=self.run_id, run_config=msgspec.to_builtins(redacted(config)),
                                     resume_step=self.step if latest is not None else None)
        self.eval_items = self._make_eval_data(cfg_key="eval")
        self.nll_data = self._make_eval_data(cfg_key="nll_eval")

    def _make_eval_data(self, cfg_key: str):
        """What dataset.<cfg_key>_factory makes (eval items or NLL datums), or None."""
        cfg = self.config
        factory = getattr(cfg.dataset, f"{cfg_key}_factory")
        if not cfg.learner.eval_every or not factory:
            return None
        data = import_callable(factory)(self.client.get_tokenizer(), **getattr(cfg.dataset, f"{cfg_key}_args"))
        if not data:
            raise ValueError(f"dataset.{cfg_key}_factory {factory!r} returned no evaluation data")
        return data

    def run(self) -> None:
        cfg = self.config
        control = transport.ControlServer(cfg.addresses.control)
        # The next batch is fetched on its own thread (which owns the request socket) while
        # the current one trains, so a step does not wait for the buffer's round trips.
        fetcher = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="rlpipe-fetch")
        requests = fetcher.submit(transport.RequestClient, cfg.addresses.batches).result()
        try:
            self._publish(control)
            # A batch is asked for with the version it will be trained at, so the buffer's
            # staleness check is exact even though the batch is fetched a step early.
            next_batch = fetcher.submit(self._next_batch, requests, self.after_seq, self.step)
            while self.step < cfg.learner.steps:
                t0 = time.monotonic()
                batch, data = self._wait_batch(next_batch, control)
                t1 = time.monotonic()
                if self.step + 1 < cfg.learner.steps:
                    next_batch = fetcher.submit(self._next_batch, requests, batch.seqs[-1], self.step + 1)
                record = self._train(batch, data)
                t2 = time.monotonic()
                if self.step % cfg.learner.sync_interval == 0:
                    record["sync/publish_s"] = self._publish(control)
                t3 = time.monotonic()
                if self.step % cfg.learner.checkpoint_every == 0 or self.step == cfg.learner.steps:
                    self._checkpoint()
                t4 = time.monotonic()
                if (self.eval_items or self.nll_data) and self.step % cfg.learner.eval_every == 0:
                    record.update(self._eval())
                t5 = time.monotonic()
                record.update({
                    "time/wait_batch_s": t1 - t0, "time/train_s": t2 - t1, "time/checkpoint_s": t4 - t3,
                    "time/eval_s": t5 - t4, "time/step_s": t5 - t0,
                    "learner/idle_frac": (t1 - t0) / max(t5 - t0, 1e-9),
                    "tokens/trained_per_s": record["tokens/trained"] / max(t2 - t1, 1e-9),
                    "tokens/sampled_per_s": record["tokens/sampled"] / max(t5 - t0, 1e-9),
                    "time_end": time.time(),  # wall clock at the end of the step ("time": at its start)
                })
                self.metrics.write(record)
                control.poll(0)
            self.ranks.stop()  # not on an error: the ranks may be inside a collective; torchrun stops them
            self.ranks.close()
            control.shutdown("learner finished", run_id=self.run_id)
            # Explorers stop at once on Shutdown; give their last pushes time to reach the
            # buffer before the buffer is told to stop (so every pushed group is counted),
            # and meanwhile tell any explorer that registers late to stop too.
            deadline = time.monotonic() + SHUTDOWN_GRACE_S
            while time.monotonic() < deadline:
                control.poll(0.1)
        finally:
            self._stop_fetching.set()
            fetcher.submit(requests.close)  # runs once a fetch in progress has seen the stop
            fetcher.shutdown(wait=True)
            control.close()
            self.metrics.close()
            if self.tinker:
                self.client.close()  # the SDK session on the endpoint

    def _wait_batch(self, future: concurrent.futures.Future, control) -> tuple[Batch, list[list[Datum]]]:
        """The prefetched batch; meanwhile the control socket keeps answering explorers."""
        while True:
            try:
                return future.result(timeout=0.05)
            except concurrent.futures.TimeoutError:
                control.poll(0)

    def _next_batch(self, requests, after_seq: int, version: int) -> tuple[Batch, list[list[Datum]]]:
        """Collect groups_per_batch groups after after_seq, for training at `version`. Asking
        with after_seq = the last seq received so far is safe: the buffer can re-serve
        anything after our checkpoint position."""
        cfg = self.config
        groups, seqs, dropped = [], [], {}
        deadline = time.monotonic() + cfg.learner.batch_timeout_s
        while len(groups) < cfg.groups_per_batch:
            if self._stop_fetching.is_set():
                raise RuntimeError("learner stopping")
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"no full batch within {cfg.learner.batch_timeout_s:.0f} s "
                    f"({len(groups)}/{cfg.groups_per_batch} groups): are the explorer and buffer running?"
                )
            request = BatchRequest(sender="learner", learner_version=version,
                                   after_seq=seqs[-1] if seqs else after_seq,
                                   max_groups=cfg.groups_per_batch - len(groups), run_id=self.run_id,
                                   incarnation=self.incarnation, durable_seq=self.durable_seq)
            reply = requests.request(request, timeout_s=5.0)
            if isinstance(reply, Shutdown):  # the buffer refuses this learner (another run, a replaced incarnation)
                raise Unrecoverable(f"the buffer at {cfg.addresses.batches} {reply.reason}; this learner is run "
                                    f"{self.run_id!r}, incarnation {self.incarnation}")
            if isinstance(reply, Batch):
                groups += reply.groups
                seqs += reply.seqs
                dropped = reply.dropped
            if not isinstance(reply, Batch) or not reply.groups:
                time.sleep(0.02)  # nothing yet: ask again shortly
        batch = Batch(groups=groups, seqs=seqs, dropped=dropped)
        return batch, self.minibatch_datums(groups)  # the datums too, off the training thread

    def minibatch_datums(self, groups: list[TrajectoryGroup]) -> list[list[Datum]]:
        """The datums of each of the batch's optim_steps_per_batch mini-batches, each normalised
        by its own action-token count."""
        lc = self.config.learner
        return [group_datums(part, overlong=lc.overlong, kl_weights=lc.kl_coef > 0)
                for part in split_groups(groups, lc.optim_steps_per_batch)]

    def _train(self, batch: Batch, minibatches: list[list[Datum]]) -> dict:
        step = self.step
        lc = self.config.learner
        started = time.time()
        lr = scheduled_lr(step, self.lr, schedule=lc.lr_schedule, warmup_steps=lc.lr_warmup_steps,
                          total_steps=lc.steps, min_ratio=lc.lr_min_ratio)
        adam = AdamParams(learning_rate=lr, grad_clip_norm=lc.grad_clip_norm, weight_decay=lc.weight_decay)
        trajectories = [t for g in batch.groups for t in g.trajectories]
        record = {"step": step + 1, "time": started, **batch_metrics(batch.groups, step),
                  "learner/incarnation": self.incarnation, "learner/processes": float(self.ranks.size),
                  # the buffer serves only this incarnation's groups: a check that explorers follow a restart
                  "explorer/incarnation_min": min(g.incarnation for g in batch.groups),
                  "optim/lr": lr,
                  "reward/truncated_frac": sum(map(is_truncated, trajectories)) / max(1, len(trajectories)),
                  # dropped here, not by the buffer: counted all the same
                  "reward/overlong_dropped": float(sum(map(is_truncated, trajectories)) if lc.overlong == "drop" else 0),
                  "tokens/trained": float(sum(d.model_input.length for data in minibatches for d in data))}
        record.update({f"dropped/{k}": float(v) for k, v in batch.dropped.items()})
        record.update({"buffer/first_seq": batch.seqs[0], "buffer/last_seq": batch.seqs[-1]})
        # All ranks train their shares of each mini-batch (one process: all of it).
        record.update(self.ranks.step(self.client, minibatches, lc.loss_fn, self.loss_config, adam))
        if not record["optim/updates"]:
            # Nothing left to train (overlong = "drop" on an all-truncated batch): the step still
            # counts, so the run keeps its length and the buffer position moves on.
            log.warning("step %d: every trajectory of the batch was left out (learner.overlong = %r): "
                        "no optimizer step", step + 1, lc.overlong)
        self.step += 1
        self.after_seq = batch.seqs[-1]
        self.groups_trained += len(batch.groups)
        return record

    def _publish(self, control) -> float:
        start = time.monotonic()
        created = time.time()
        version = self.step
        if self.tinker:  # the explorers sample these weights on the endpoint
            path = self.client.save_weights_for_sampler(f"v{version:06d}").result().path
            log.info("published version %d: %s", version, path)
            control.publish(WeightUpdate(version=version, sampler_path=path, step=version, created_at=created,
                                         run_id=self.run_id, incarnation=self.incarnation))
            return time.monotonic() - start
        files = self.client.get_sampler_weights().result()
        control.publish(WeightUpdate(version=version, adapter_config=files[checkpoint.ADAPTER_CONFIG],
                                     adapter_weights=files[checkpoint.ADAPTER_WEIGHTS], step=version, created_at=created,
                                     run_id=self.run_id, incarnation=self.incarnation))
        return time.monotonic() - start

    def _checkpoint(self) -> None:
        path = self.client.save_state(f"step-{self.step:06d}").result().path
        latest = self.dir / LATEST
        tmp = latest.with_suffix(".tmp")
        tmp.write_text(json.dumps({"path": path, "step": self.step, "optim_steps": self.client.step,
                                   "after_seq": self.after_seq, "groups_trained": self.groups_trained,
                                   "incarnation": self.incarnation}))
        if not self.tinker:  # a tinker:// checkpoint is the endpoint's to keep
            checkpoint.fsync_tree(path)
        checkpoint.fsync_tree(tmp)
        os.replace(tmp, latest)  # atomic: a crash leaves the previous checkpoint in force
        checkpoint.fsync_tree(self.dir / LATEST)  # the rename itself, in the directory
        # Only now may the buffer forget what this checkpoint has trained (compaction): the
        # checkpoint is on disk, so no crash can take the learner back behind durable_seq.
        self.durable_seq = self.after_seq
        if self.tinker:
            self.client.prune_states(self.config.learner.keep_checkpoints, keep=path)
        else:
            prune(self.dir / "state", "step-", self.config.learner.keep_checkpoints, keep=Path(path).name)

    def _eval(self) -> dict[str, float]:
        from rlpipe.evaluators import greedy_eval, nll_eval

        cfg = self.config
        out = nll_eval(self.client, self.nll_data) if self.nll_data else {}
        if self.eval_items and self.tinker:  # sampled on the endpoint
            path = self.client.save_weights_for_sampler(f"eval-{self.step:06d}").result().path
            out |= self.client.greedy_eval(path, self.eval_items, max_tokens=cfg.explorer.max_tokens,
                                           policy_version=self.step)
        elif self.eval_items:
            path = self.client.save_weights_for_sampler(f"eval-{self.step:06d}").result().path
            prune(Path(path).parent, "eval-", cfg.learner.keep_checkpoints, keep=Path(path).name)
            options = {}
            if cfg.learner.eval_sampler == "local" and self.client.device.type != "cpu":
                options["device"] = "cpu"  # no second copy of the model on the learner's GPU
            out |= greedy_eval(cfg.model_path(), path, self.eval_items, self.client.get_tokenizer(),
                               max_tokens=cfg.explorer.max_tokens, backend=cfg.learner.eval_sampler,
                               policy_version=self.step, **options)
        return out


def prune(folder: Path, prefix: str, keep_newest: int, keep: str) -> list[str]:
    """Delete all but the newest keep_newest directories named prefix* in folder (names sort
    by step); `keep` (the one just written) always stays. Returns the names deleted."""
    if keep_newest <= 0:
        return []
    names = sorted(p.name for p in folder.iterdir() if p.is_dir() and p.name.startswith(prefix))
    doomed = [n for n in names[:-keep_newest] if n != keep]
    for name in doomed:
        shutil.rmtree(folder / name, ignore_errors=True)
    return doomed
