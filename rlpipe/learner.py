"""The learner role: pull batches from the buffer, train, publish adapters, checkpoint.

    while step < steps:
        batch = buffer.next(groups_per_batch)     # BatchRequest(after_seq = last trained seq)
        forward_backward(datums(batch)); optim_step
        every sync_interval steps: WeightUpdate(version = step, adapter bytes) -> explorers
        every checkpoint_every steps: save_state + the buffer position

The policy version is the optimizer step count, so "u - v" in the staleness rule is counted
in optimizer steps.
"""

from __future__ import annotations

import io
import json
import logging
import os
import shutil
import tarfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from rlpipe import transport
from rlpipe.config import RunConfig, import_callable
from rlpipe.hyperparams import get_lr
from rlpipe.metrics import MetricsWriter, mean_of
from rlpipe.training import TrainingClient
from rlpipe.types import (AdamParams, Batch, BatchRequest, Datum, LoraConfig, ModelInput,
                          TrajectoryGroup, WeightUpdate)

log = logging.getLogger(__name__)
LATEST = "latest.json"
SHUTDOWN_GRACE_S = 3.0
KEEP_SAMPLER_WEIGHTS = 2


def group_datums(groups: list[TrajectoryGroup]) -> list[Datum]:
    """One Datum per trajectory, trained on exactly the sampled tokens. Advantages are spread
    over action tokens and divided by the batch's action-token count: the summed loss is then
    a per-token mean, so the step size does not grow with response length or batch size."""
    trajectories = [t for g in groups for t in g.trajectories]
    n_action = max(1, sum(sum(t.action_mask[1:]) for t in trajectories))
    data = []
    for t in trajectories:
        mask = np.asarray(t.action_mask[1:], dtype=np.float32)
        data.append(Datum(
            model_input=ModelInput.from_ints(t.tokens[:-1]),
            loss_fn_inputs={
                "target_tokens": np.asarray(t.tokens[1:], dtype=np.int64),
                "logprobs": np.asarray(t.sampling_logprobs[1:], dtype=np.float32),
                "advantages": mask * np.float32(t.advantage / n_action),
                "weights": mask,
            },
        ))
    return data


def pack_adapter(path: str) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        tar.add(path, arcname=".")
    return buf.getvalue()


def batch_metrics(groups: list[TrajectoryGroup], step: int) -> dict[str, float]:
    trajectories = [t for g in groups for t in g.trajectories]
    rewards = np.array([t.reward for t in trajectories])
    staleness = Counter(step - min(v for v in t.policy_versions if v >= 0) for t in trajectories)
    out = {
        "reward/mean": float(rewards.mean()), "reward/std": float(rewards.std()),
        "groups": len(groups), "trajectories": len(trajectories),
        "tokens/sampled": float(sum(sum(t.action_mask) for t in trajectories)),
        "tokens/trained": float(sum(len(t.tokens) - 1 for t in trajectories)),
        **{f"staleness/{k}": float(n) for k, n in sorted(staleness.items())},
        "staleness/max": float(max(staleness)),
    }
    keys = {k for t in trajectories for k in t.metrics}
    out.update({f"env/{k}": mean_of(t.metrics.get(k) for t in trajectories) for k in sorted(keys)})
    stats = [g.explorer_stats for g in groups if g.explorer_stats]
    if stats:
        out.update({f"explorer/{k}": v for k, v in stats[-1].items()})
    return out


def latest_checkpoint(run_dir: Path) -> dict | None:
    """The learner's newest checkpoint, {"path", "step", "after_seq"} (its PEFT adapter is
    path/adapter), or None before the first one."""
    latest = Path(run_dir) / "learner" / LATEST
    return json.loads(latest.read_text()) if latest.exists() else None


class Learner:
    def __init__(self, config: RunConfig, resume: bool = False):
        self.config = config
        self.dir = config.run_dir / "learner"
        threads = config.learner.cpu_threads
        if not threads and not torch.cuda.is_available():
            threads = max(1, (os.cpu_count() or 2) // 2)
        if threads:
            torch.set_num_threads(threads)
        model = config.model_path()
        lora = LoraConfig(rank=config.learner.rank, seed=config.seed)
        self.client = TrainingClient(model, lora, self.dir)
        self.after_seq = 0
        latest = latest_checkpoint(config.run_dir) if resume else None
        if latest is not None:
            self.client.load_state_with_optimizer(latest["path"]).result()
            self.after_seq = latest["after_seq"]
            log.info("resumed at step %d, buffer position %d", self.client.step, self.after_seq)
        elif config.learner.init_from:
            self.client.load_state(config.learner.init_from).result()
        self.lr = config.learner.learning_rate or get_lr(model)
        self.loss_config = {**config.learner.loss_fn_config, "temperature": config.explorer.temperature}
        self.metrics = MetricsWriter(config.run_dir / "metrics.jsonl")
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
        a = cfg.addresses
        requests = transport.RequestClient(a.batches)
        control = transport.ControlServer(a.control)
        try:
            self._publish(control)
            while self.client.step < cfg.learner.steps:
                t0 = time.monotonic()
                batch = self._next_batch(requests, control)
                t1 = time.monotonic()
                record = self._train(batch)
                t2 = time.monotonic()
                if self.client.step % cfg.learner.sync_interval == 0:
                    record["sync/publish_s"] = self._publish(control)
                if self.client.step % cfg.learner.checkpoint_every == 0 or self.client.step == cfg.learner.steps:
                    self._checkpoint()
                if (self.eval_items or self.nll_data) and self.client.step % cfg.learner.eval_every == 0:
                    record.update(self._eval())
                t3 = time.monotonic()
                record.update({
                    "time/wait_batch_s": t1 - t0, "time/train_s": t2 - t1, "time/step_s": t3 - t0,
                    "learner/idle_frac": (t1 - t0) / max(t3 - t0, 1e-9),
                    "tokens/trained_per_s": record["tokens/trained"] / max(t2 - t1, 1e-9),
                    "tokens/sampled_per_s": record["tokens/sampled"] / max(t3 - t0, 1e-9),
                })
                self.metrics.write(record)
                control.poll(0)
            control.shutdown("learner finished")
            # Explorers stop at once on Shutdown; give their last pushes time to reach the
            # buffer before the buffer is told to stop (so every pushed group is counted).
            time.sleep(SHUTDOWN_GRACE_S)
        finally:
            requests.close()
            control.close()
            self.metrics.close()

    def _next_batch(self, requests, control) -> Batch:
        """Collect groups_per_batch groups; asking with after_seq = the last seq received so
        far is safe, because the buffer can re-serve anything after our checkpoint position."""
        cfg = self.config
        groups, seqs, dropped = [], [], {}
        deadline = time.monotonic() + cfg.learner.batch_timeout_s
        while len(groups) < cfg.groups_per_batch:
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"no full batch within {cfg.learner.batch_timeout_s:.0f} s "
                    f"({len(groups)}/{cfg.groups_per_batch} groups): are the explorer and buffer running?"
                )
            control.poll(0)
            request = BatchRequest(sender="learner", learner_version=self.client.step,
                                   after_seq=seqs[-1] if seqs else self.after_seq,
                                   max_groups=cfg.groups_per_batch - len(groups))
            reply = requests.request(request, timeout_s=5.0)
            if isinstance(reply, Batch):
                groups += reply.groups
                seqs += reply.seqs
                dropped = reply.dropped
            if not isinstance(reply, Batch) or not reply.groups:
                control.poll(0.2)  # nothing yet: wait a little, answering explorers meanwhile
        return Batch(groups=groups, seqs=seqs, dropped=dropped)

    def _train(self, batch: Batch) -> dict:
        step = self.client.step
        record = {"step": step + 1, "time": time.time(), **batch_metrics(batch.groups, step)}
        record.update({f"dropped/{k}": float(v) for k, v in batch.dropped.items()})
        record.update({"buffer/first_seq": batch.seqs[0], "buffer/last_seq": batch.seqs[-1]})
        data = group_datums(batch.groups)
        fb = self.client.forward_backward(data, self.config.learner.loss_fn, self.loss_config)
        opt = self.client.optim_step(AdamParams(learning_rate=self.lr, grad_clip_norm=self.config.learner.grad_clip_norm,
                                                weight_decay=self.config.learner.weight_decay))
        record.update(fb.result().metrics)
        record.update(opt.result().metrics)
        self.after_seq = batch.seqs[-1]
        return record

    def _publish(self, control) -> float:
        start = time.monotonic()
        created = time.time()
        version = self.client.step
        path = self.client.save_weights_for_sampler(f"v{version:06d}").result().path
        control.publish(WeightUpdate(version=version, adapter_tar=pack_adapter(path), step=version, created_at=created))
        # The bytes went out with the message; on disk only the newest few are kept.
        for old in sorted(Path(path).parent.glob("v[0-9]*"))[:-KEEP_SAMPLER_WEIGHTS]:
            shutil.rmtree(old, ignore_errors=True)
        return time.monotonic() - start

    def _checkpoint(self) -> None:
        path = self.client.save_state(f"step-{self.client.step:06d}").result().path
        latest = self.dir / LATEST
        tmp = latest.with_suffix(".tmp")
        tmp.write_text(json.dumps({"path": path, "step": self.client.step, "after_seq": self.after_seq}))
        os.replace(tmp, latest)  # atomic: a crash leaves the previous checkpoint in force

    def _eval(self) -> dict[str, float]:
        from rlpipe.evaluators import greedy_eval, nll_eval

        cfg = self.config
        out = nll_eval(self.client, self.nll_data) if self.nll_data else {}
        if self.eval_items:
            path = self.client.save_weights_for_sampler(f"eval-{self.client.step:06d}").result().path
            out |= greedy_eval(cfg.model_path(), path, self.eval_items, self.client.get_tokenizer(),
                               max_tokens=cfg.explorer.max_tokens, backend=cfg.learner.eval_sampler,
                               policy_version=self.client.step)
        return out
