"""The learner role: pull batches from the buffer, train, publish adapters, checkpoint.

    while step < steps:
        batch = buffer.next(groups_per_batch)     # fetched a step ahead (fetch.py)
        for each of optim_steps_per_batch mini-batches: forward_backward(datums); optim_step
        step += 1
        every sync_interval steps: WeightUpdate(version = step) -> explorers   (control.py, while
                                                                                the next step trains)
        every checkpoint_every steps: a checkpoint, and the buffer position (latest.json)

The learner calls one client, whichever backend trains; training_client() is the one place
learner.backend is looked at: LocalTrainingClient (pipeline/local_training.py, which lists the
calls) over a TrainingClient in this process, or TinkerTrainingClient (pipeline/tinker/
training.py) over the official tinker SDK on a Tinker endpoint.

With learner.processes = N (or under torchrun) the learner is N data-parallel ranks: this
class runs on rank 0, the other ranks run follow() (rlpipe/pipeline/distributed.py);
run_learner() is `rlpipe learner`, which starts them.

The policy version is the learner's step count (batches trained), kept by the learner apart
from the client's optimizer-step count (several per batch with optim_steps_per_batch > 1), so
"u - v" in the staleness rule, `steps`, sync_interval and checkpoint_every count batches.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from pathlib import Path

import msgspec
import torch

from rlpipe.datums import batch_metrics, group_datums, is_truncated, split_groups
from rlpipe.metrics import MetricsWriter
from rlpipe.pipeline import distributed, identity, transport
from rlpipe.pipeline.config import RunConfig, import_callable, redacted, resolve_train_unembed
from rlpipe.pipeline.control import ControlThread
from rlpipe.pipeline.errors import EXIT_UNRECOVERABLE
from rlpipe.pipeline.fetch import BatchFetcher
from rlpipe.pipeline.local_training import LocalTrainingClient
from rlpipe.training.checkpoint import write_json_atomic
from rlpipe.training.hyperparams import get_lr, scheduled_lr
from rlpipe.types import AdamParams, Batch, Datum, LoraConfig, Shutdown, TrajectoryGroup, WeightUpdate

log = logging.getLogger(__name__)
LATEST = "latest.json"
LATEST_FORMAT = 2
"""latest.json's "path" is relative to the run directory (or a tinker:// path), so a run
resumes from any working directory, and after its directory moved. Format 1 (no "format")
held the path as the learner had it: relative to the working directory it ran in."""
SHUTDOWN_GRACE_S = 3.0
PUBLISH_DRAIN_S = 600.0  # the most the end of a run waits for its last adapter to be sent


def latest_checkpoint(run_dir: Path) -> dict | None:
    """The learner's newest checkpoint, {"path", "step", "optim_steps", "after_seq",
    "groups_trained", "incarnation"} (its PEFT adapter is path/adapter; "step" counts learner
    steps, "optim_steps" the optimizer's, absent before optim_steps_per_batch), or None before
    the first one. "path" is usable from this working directory."""
    latest = Path(run_dir) / "learner" / LATEST
    if not latest.exists():
        return None
    record = json.loads(latest.read_text())
    path = record["path"]
    if path.startswith("tinker://"):  # the endpoint's
        return record
    if record.get("format", 1) >= 2:
        record["path"] = str(Path(run_dir) / path)
    elif not Path(path).exists():  # format 1, read from elsewhere: the same checkpoint by its name
        record["path"] = str(Path(run_dir) / "learner" / "state" / Path(path).name)
    return record


def write_latest(run_dir: Path, path: str, **fields) -> None:
    """Make the checkpoint at path (in run_dir, or tinker://) the newest, atomically: a crash
    leaves the previous one in force."""
    stored = path if path.startswith("tinker://") else os.path.relpath(path, run_dir)
    write_json_atomic(Path(run_dir) / "learner" / LATEST, {"format": LATEST_FORMAT, "path": stored, **fields})


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
    threads = lc.cpu_threads
    if not threads and not torch.cuda.is_available():
        # the cores this process may use (taskset, cgroups), shared by the ranks on this host
        threads = max(1, len(os.sched_getaffinity(0)) // 2 // int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    if threads:
        torch.set_num_threads(threads)
    return ranks, device


def training_client(config: RunConfig, learner_dir: Path, ranks: distributed.Ranks, device: str):
    """The learner's client for learner.backend (see the module's docstring)."""
    if config.learner.backend == "tinker":
        if ranks.size > 1:
            raise ValueError('a learner under torchrun needs learner.backend = "local": with "tinker" the endpoint trains')
        from rlpipe.pipeline.tinker.training import TinkerTrainingClient

        return TinkerTrainingClient(config, _lora(config), learner_dir)
    return LocalTrainingClient(config, _lora(config), learner_dir, ranks, device)


def follow(config: RunConfig) -> None:
    """A learner rank other than 0 (torchrun): the same model, given rank 0's adapter and
    optimizer state, trained on the shares of each batch that rank 0 sends, until it stops."""
    ranks, device = _join_ranks(config)
    client = training_client(config, config.run_dir / "learner", ranks, device)
    try:
        client.start_from(None, with_optimizer=False)
        ranks.follow(client)
    finally:
        client.close()
    ranks.close()


class Learner:
    def __init__(self, config: RunConfig, resume: bool = False):
        self.config = config
        self.dir = config.run_dir / "learner"
        self.ranks, device = _join_ranks(config)
        lc = config.learner
        self.client = training_client(config, self.dir, self.ranks, device)
        self.step = 0
        """Learner steps (batches trained): the policy version. The client counts optimizer steps."""
        self.after_seq = 0
        self.durable_seq = 0
        """The buffer position of the newest checkpoint: a restart asks again from there."""
        self.groups_trained = 0
        self.run_id = identity.run_id(config.run_dir)
        self.incarnation = identity.next_incarnation(self.dir)
        latest = latest_checkpoint(config.run_dir) if resume else None
        if latest is not None:
            self.client.start_from(latest["path"], with_optimizer=True)
            self.step = latest["step"]
            self.after_seq = self.durable_seq = latest["after_seq"]
            self.groups_trained = latest.get("groups_trained", 0)
            log.info("resumed at step %d (%d optimizer steps), buffer position %d", self.step, self.client.step,
                     self.after_seq)
        else:
            self.client.start_from(lc.init_from or None, with_optimizer=False)
        log.info("learner incarnation %d of run %s", self.incarnation, self.run_id)
        self.lr = lc.learning_rate or get_lr(config.model_path())
        """The peak learning rate; each step's is scheduled_lr (learner.lr_schedule)."""
        self.loss_config = {**lc.loss_fn_config, "temperature": config.explorer.temperature}
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
        with contextlib.ExitStack() as closing:  # on the way out, in this order: fetcher, control, metrics
            closing.callback(self.metrics.close)
            control = ControlThread(cfg.addresses.control)
            closing.callback(control.close)
            fetcher = BatchFetcher(cfg, self.run_id, self.incarnation, lambda: self.durable_seq, self.minibatch_datums)
            closing.callback(fetcher.close)
            self._publish(control)
            next_batch = fetcher.submit(self.after_seq, self.step)
            while self.step < cfg.learner.steps:
                t0 = time.monotonic()
                batch, data, hunt = control.wait(next_batch)  # the control thread's errors are raised meanwhile
                t1 = time.monotonic()
                if self.step + 1 < cfg.learner.steps:
                    next_batch = fetcher.submit(batch.seqs[-1], self.step + 1)
                record = {**self._train(batch, data), **hunt}
                t2 = time.monotonic()
                if self.step % cfg.learner.sync_interval == 0:
                    self._publish(control)
                if control.publish_s is not None:
                    record["sync/publish_s"] = control.publish_s
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
                control.check()
            self.ranks.stop()  # not on an error: the ranks may be inside a collective; torchrun stops them
            self.ranks.close()
            control.shutdown("learner finished", run_id=self.run_id)  # after the last adapter is sent
            control.drain(PUBLISH_DRAIN_S)
            # Explorers stop at once on Shutdown; give their last pushes time to reach the
            # buffer before the buffer is told to stop (so every pushed group is counted),
            # while the control thread tells any explorer that registers late to stop too.
            time.sleep(SHUTDOWN_GRACE_S)
            self.client.close()  # after a normal end only: on an error the process ends, its model thread too

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

    def _publish(self, control: ControlThread) -> None:
        """The adapter as it is after the calls made so far, to the explorers: the client takes
        it (the model thread, before the next step's work), the control thread sends it."""
        update = WeightUpdate(version=self.step, step=self.step, created_at=time.time(), run_id=self.run_id,
                              incarnation=self.incarnation)
        control.publish(update, self.client.publish(self.step))

    def _checkpoint(self) -> None:
        path = self.client.checkpoint(f"step-{self.step:06d}")
        write_latest(self.config.run_dir, path, step=self.step, optim_steps=self.client.step,
                     after_seq=self.after_seq, groups_trained=self.groups_trained, incarnation=self.incarnation)
        # Only now may the buffer forget what this checkpoint has trained (compaction): the
        # checkpoint is on disk, so no crash can take the learner back behind durable_seq.
        self.durable_seq = self.after_seq
        self.client.prune_checkpoints(self.config.learner.keep_checkpoints, keep=path)

    def _eval(self) -> dict[str, float]:
        from rlpipe.evaluators import nll_eval

        out = nll_eval(self.client, self.nll_data) if self.nll_data else {}
        if self.eval_items:
            out |= self.client.evaluate(self.step, self.eval_items)
        return out


def run_learner(config: RunConfig, cli_args: list[str], resume: bool) -> int:
    """`rlpipe learner` (cli_args: its arguments); returns its exit code. With learner.processes
    > 1, outside torchrun: this very command again as that many ranks under torchrun, and this
    process only waits (it is what `rlpipe run` supervises and stops). Under torchrun, rank 0
    runs the Learner and then tells the buffer to stop (Shutdown), the other ranks follow()."""
    from rlpipe.pipeline.role import EXIT_SIGTERM, supervised

    if config.learner.processes > 1 and not distributed.under_torchrun():
        try:
            return distributed.run_torchrun(config.learner.processes, cli_args,
                                            config.run_dir / "logs" / "learner.unrecoverable")
        except KeyboardInterrupt:  # SIGTERM: torchrun and its workers were stopped on the way out
            return EXIT_SIGTERM
    rank = int(os.environ.get("RANK", "0"))
    try:
        if rank != 0:  # a torchrun rank other than 0: it only trains. Its heartbeat and error files
            # are its own: learner.failed keeps rank 0's error, not the others' "connection closed"
            with supervised(f"learner-rank{rank}", config):
                follow(config)
            return 0
        with supervised("learner", config):
            Learner(config, resume=resume).run()
    except SystemExit as stop:
        if stop.code == EXIT_UNRECOVERABLE and (mark := os.environ.get(distributed.UNRECOVERABLE_MARK)):
            Path(mark).touch()  # torchrun itself exits 1 whatever its ranks exit with
        raise
    # Tell the buffer we are done so it writes its final stats and exits.
    client = transport.RequestClient(config.addresses.batches)
    try:
        client.request(Shutdown(reason="learner finished", run_id=identity.run_id(config.run_dir)), timeout_s=10)
    finally:
        client.close()
    return 0
