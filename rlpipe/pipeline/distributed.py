"""The learner on several processes: data-parallel LoRA training under torchrun.

    torchrun --nproc-per-node N -m rlpipe.cli learner CONFIG.toml      (what learner.processes = N starts)

Every rank holds the whole model with the whole adapter (LoRA: the base is frozen, so the
adapter and Adam's state are small). Rank 0 is the learner role as a single process runs it:
it fetches the batches from the buffer, publishes adapters, writes checkpoints and metrics.
Each learner step:

    rank 0: the batch's datums (advantages / the whole batch's action-token count)
            --scatter--> each rank its share of every mini-batch (balanced by tokens)
    every rank: forward_backward(share) -> all_reduce(SUM) of the adapter's gradients
                -> clip (the full gradient's norm) -> AdamW step, the same on every rank
    rank 0: gathers the ranks' loss metrics and merges them

SUM, not DDP's average: the losses are token sums and group_datums has already divided the
advantages by the whole batch's action-token count, so the batch's gradient is the sum of the
shares' gradients, and N ranks take exactly the step one process takes on the whole batch
(tests/test_distributed_learner.py, float64, 1e-5).

An explicit all_reduce rather than torch.nn.parallel.DistributedDataParallel: DDP reduces in
backward hooks and needs every rank to run the same number of backward passes, but a rank's
share is trained in as many micro-batches as its tokens need (learner.max_tokens_per_micro_batch),
and a small mini-batch can leave a rank no datum at all. One all_reduce of the adapter's
gradients just before each optimizer step is what DDP computes for a frozen base (only the
adapter has gradients), works with any micro-batch count, and is one collective per step.

learner.strategy = "fsdp" shards the frozen base over the ranks with FSDP2 (fully_shard on each
decoder layer, under the decoder as root), for a base that does not fit one device: a rank keeps
1/N of each layer's weights and gathers a layer's whole weights only while that layer runs.
The LoRA adapter stays whole on every rank (FSDP's ignored_params) and its gradients are summed
as above. So FSDP needs no gradient reduction of its own (the base has no gradients) and
pytorch#162338 (gloo FSDP2 sums where it should average) cannot touch the step; the adapter,
its optimizer state, checkpoints and published weights are exactly as with "ddp". The input
embeddings, the final norm and the output head stay whole too (a tied head shares its weight
with the embeddings, and FSDP must hold a shared weight in one group). Each layer's weights are
gathered in every forward and backward pass, so every rank must run as many passes: a rank
with fewer micro-batches (or no share) runs passes without data (TrainingClient.before_passes).

Resume works with any number of ranks: a checkpoint is one adapter and one optimizer state
(every rank holds the same ones; rank 0 writes them), and at start rank 0, which loaded the
checkpoint, sends its adapter, optimizer state and step to the other ranks (as DDP broadcasts
the module's state when it is built), so no other rank reads the run directory.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import socket
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from rlpipe.datums import merge_metrics, minibatch_metrics, submit_minibatches
from rlpipe.pipeline.errors import EXIT_UNRECOVERABLE
from rlpipe.types import AdamParams, Datum

log = logging.getLogger(__name__)


def under_torchrun() -> bool:
    """Whether torchrun (torch.distributed.run) started this process: it sets these."""
    return "LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ


def rank_device(device: str) -> str:
    """The device of this rank: with several ranks on CUDA, "" or "cuda" means this rank's own
    GPU (cuda:LOCAL_RANK), as torchrun users expect; "cuda:3,4" means the LOCAL_RANK-th of
    those; anything else is taken as given."""
    if "," in device:
        ids = device.partition(":")[2].split(",")
        local = int(os.environ["LOCAL_RANK"]) if under_torchrun() else 0
        if local >= len(ids):
            raise ValueError(f"learner.device {device!r} has no GPU for local rank {local}: give one per process")
        return f"cuda:{ids[local].strip()}"
    if under_torchrun() and int(os.environ["WORLD_SIZE"]) > 1 and device in ("", "cuda") and torch.cuda.is_available():
        return f"cuda:{os.environ['LOCAL_RANK']}"
    return device


UNRECOVERABLE_MARK = "RLPIPE_UNRECOVERABLE_MARK"
"""A file a rank creates when it fails with an error no restart can fix (errors.Unrecoverable):
torchrun reports any failed rank as exit code 1, so this is how that error's exit code
(EXIT_UNRECOVERABLE: `rlpipe run` stops instead of restarting) gets through."""


STORE_ENV = "RLPIPE_DIST_STORE"
"""host:port of the TCPStore the ranks meet on, when the launcher hosts one (local_torchrun)."""


@contextlib.contextmanager
def local_torchrun(processes: int, module_args: list[str]):
    """(command, environment) of `python -m torch.distributed.run ... <module_args>` as `processes`
    ranks on this host, every server of it on 127.0.0.1. torchrun --standalone would host its
    rendezvous store, and rank 0 the ranks' store, on every interface; here this process hosts
    one store on loopback (a listening socket of its own, TCPStore's master_listen_fd) for the
    rendezvous (is_host=false: the agent is a client) and for the ranks (Ranks joins through
    STORE_ENV; TORCH_DISABLE_SHARE_RDZV_TCP_STORE: the agent starts no store of its own), and
    gloo and NCCL connect the ranks over the loopback interface. The store lives while the
    context does."""
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    # The store owns the socket from here: it closes it when it goes.
    store = dist.TCPStore("127.0.0.1", port, is_master=True, master_listen_fd=listener.detach(), wait_for_workers=False)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", f"--nproc-per-node={processes}",
           "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}", "--rdzv-conf=is_host=false",
           "--local-addr=127.0.0.1", *module_args]
    env = {**os.environ, STORE_ENV: f"127.0.0.1:{port}", "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1",
           "GLOO_SOCKET_IFNAME": "lo", "NCCL_SOCKET_IFNAME": "lo"}
    try:
        yield cmd, env
    finally:
        del store


def run_torchrun(processes: int, cli_args: list[str], mark: Path) -> int:
    """Run `rlpipe <cli_args>` as `processes` ranks under torchrun on this host (local_torchrun)
    and wait for it; its exit code, EXIT_UNRECOVERABLE if a rank created `mark`. A SIGTERM to
    this process (KeyboardInterrupt, see role.stop_on_sigterm) is passed on: torchrun stops its
    workers, which are in sessions of their own."""
    mark.unlink(missing_ok=True)
    with local_torchrun(processes, ["-m", "rlpipe.cli", *cli_args]) as (cmd, env):
        proc = subprocess.Popen(cmd, env={**env, UNRECOVERABLE_MARK: str(mark)})
        try:
            code = proc.wait()
            return EXIT_UNRECOVERABLE if code != 0 and mark.exists() else code
        finally:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()


def die_with_agent() -> None:
    """A torchrun worker gets SIGTERM when the torchrun agent dies, even by SIGKILL: the agent
    starts its workers in sessions of their own, out of reach of a group kill (Linux)."""
    if not under_torchrun() or not sys.platform.startswith("linux"):
        return
    agent = os.getppid()
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    if os.getppid() != agent:  # the agent died before the line above
        os.kill(os.getpid(), signal.SIGTERM)


def balanced_shares(data: list[Datum], n: int) -> list[list[Datum]]:
    """data in n shares of about equal token counts (longest first, each to the lightest share),
    each share in the datums' order. Any split gives the same sum of gradients; this one gives
    the ranks equal work."""
    loads, owner = [0] * n, [0] * len(data)
    for i in sorted(range(len(data)), key=lambda i: -data[i].model_input.length):
        owner[i] = min(range(n), key=loads.__getitem__)
        loads[owner[i]] += data[i].model_input.length
    return [[d for d, o in zip(data, owner) if o == r] for r in range(n)]


def merge_shares(records: list[dict[str, float]]) -> dict[str, float]:
    """One mini-batch's metrics from its shares' (merge_metrics by suffix), except "loss:sum":
    each share's loss is its part of the mini-batch's per-token mean, so the shares' losses add up."""
    out = merge_metrics(records)
    out["loss:sum"] = float(sum(r["loss:sum"] for r in records))
    return out


def _to_cpu(value):
    """The optimizer's state with its tensors on the CPU, to send as an object."""
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if isinstance(value, dict):
        return {k: _to_cpu(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_to_cpu(v) for v in value)
    return value


STRATEGIES = ("ddp", "fsdp")


class Ranks:
    """This learner's data-parallel processes: one (no torchrun, or a world of 1) or torchrun's
    WORLD_SIZE. Rank 0 calls step(); every other rank calls follow() until rank 0's stop()."""

    def __init__(self, device: str, timeout_s: float, strategy: str = "ddp"):
        """device: this rank's (rank_device); NCCL on CUDA, gloo on the CPU. timeout_s bounds
        every wait on the other ranks (joining, each collective): a rank that waits longer fails.
        strategy: "ddp" (every rank holds the whole base) or "fsdp" (the base sharded: pass
        place() to the TrainingClient)."""
        if strategy not in STRATEGIES:
            raise ValueError(f"unknown learner.strategy {strategy!r}; choose one of {STRATEGIES}")
        self.rank = int(os.environ.get("RANK", "0")) if under_torchrun() else 0
        self.size = int(os.environ.get("WORLD_SIZE", "1")) if under_torchrun() else 1
        self.device = torch.device(device or "cpu")
        self.place = self._shard if strategy == "fsdp" and self.size > 1 else None
        """For the TrainingClient: shards the base over the ranks (None: each holds all of it)."""
        self.objects = None
        """The group that carries Python objects (the datums, metrics): gloo, on the CPU, also
        when the gradients go over NCCL."""
        if self.size == 1:
            return
        timeout = timedelta(seconds=timeout_s)
        joined = {}
        if STORE_ENV in os.environ:  # started by local_torchrun: its loopback store, as a client
            host, _, port = os.environ[STORE_ENV].rpartition(":")
            store = dist.TCPStore(host, int(port), is_master=False, timeout=timeout)
            attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
            joined = {"store": dist.PrefixStore(f"rlpipe-ranks/{attempt}", store), "rank": self.rank,
                      "world_size": self.size}
        if torch.device(device or "cpu").type == "cuda":
            torch.cuda.set_device(device)
            dist.init_process_group("nccl", timeout=timeout, device_id=torch.device(device), **joined)
            self.objects = dist.new_group(backend="gloo", timeout=timeout)
        else:
            dist.init_process_group("gloo", timeout=timeout, **joined)

    def attach(self, client) -> None:
        """Make client's optimizer steps sum the ranks' gradients first, and give every rank
        rank 0's adapter, optimizer state and step (loaded from a checkpoint or freshly made)."""
        if self.size == 1:
            return
        client.grad_sync = self._sum_grads
        if self.place is not None:
            client.before_passes = self._match_passes
        client.base.run(self._sync_state, client)

    def _shard(self, model: torch.nn.Module) -> None:
        """FSDP2 over the base's decoder layers, the adapter left out (ignored_params); what
        FSDP does not manage (the adapter, embeddings, norm, head) goes to this rank's device."""
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard
        from torch.distributed.tensor import DTensor

        body = model.get_base_model().get_decoder()
        layers = getattr(body, "layers", None)
        if not isinstance(layers, torch.nn.ModuleList) or not len(layers):
            raise ValueError(f'learner.strategy = "fsdp": {type(body).__name__} has no list of decoder layers '
                             "(.layers)")
        mesh = init_device_mesh(self.device.type, (self.size,))
        adapter = {p for p in model.parameters() if p.requires_grad}
        for layer in layers:
            fully_shard(layer, mesh=mesh, ignored_params=adapter & set(layer.parameters()))
        in_layers = {p for layer in layers for p in layer.parameters()}
        # The decoder as root (with nothing of its own to shard): one lazy start for all layers.
        fully_shard(body, mesh=mesh, ignored_params={p for p in body.parameters() if p not in in_layers} | adapter)
        for module in model.modules():
            for p in module.parameters(recurse=False):
                if not isinstance(p, DTensor):
                    p.data = p.data.to(self.device)  # the same Parameter: the adapter's list stays valid
            for name, buffer in module.named_buffers(recurse=False):
                setattr(module, name, buffer.to(self.device))
        frozen = [p for p in layers.parameters() if not p.requires_grad]
        held = sum(p.to_local().numel() for p in frozen) / sum(p.numel() for p in frozen)
        log.info("learner rank %d: FSDP over %d ranks, holding %.1f%% of the decoder layers' base weights",
                 self.rank, self.size, 100 * held)

    def _match_passes(self, client, passes: int, with_ref: bool, with_grad: bool) -> None:
        """TrainingClient.before_passes on a sharded base: every rank runs as many passes as the
        busiest one, and the same reference passes. A rank with fewer first runs passes over
        one token that change nothing (the loss is 0 times the logprob), each with the layer
        calls of a real one: reference forward, forward, backward."""
        mine = torch.tensor([passes, int(with_ref)], dtype=torch.int64)
        dist.all_reduce(mine, op=dist.ReduceOp.MAX, group=self.objects)
        most, any_ref = int(mine[0]), bool(mine[1])
        if passes and any_ref != with_ref:
            raise ValueError("the ranks disagree on computing reference logprobs (kl_coef): give every datum "
                             "ref_logprobs, or none")
        tokens = targets = [np.zeros(1, dtype=np.int64)]
        batch = client.forward_pass.plan([1])[0]
        for _ in range(most - passes):
            if any_ref:
                client.reference_logprobs(batch, tokens, targets, 1.0)
            with torch.set_grad_enabled(with_grad):
                logprobs, _ = client.forward_pass.logprobs(batch, tokens, targets, 1.0)
            if with_grad:
                (logprobs.sum() * 0.0).backward()

    def _sync_state(self, client) -> None:  # on the client's model thread
        for p in client.base.adapter_params(client.adapter):
            dist.broadcast(p.data, src=0)
        state = [_to_cpu(client.optimizer.state_dict()), client.step] if self.rank == 0 else [None, None]
        dist.broadcast_object_list(state, src=0, group=self.objects)
        if self.rank != 0:
            client.optimizer.load_state_dict(state[0])
            client.step = state[1]

    def _sum_grads(self, params: list[torch.Tensor]) -> None:
        """All-reduce (SUM) of the adapter's gradients as one flat tensor; a rank that trained
        nothing this step adds zeros."""
        flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        for p, g in zip(params, flat.split([p.numel() for p in params])):
            p.grad = g.view_as(p).to(p.dtype)

    def step(self, client, minibatches: list[list[Datum]], loss_fn: str, loss_config: dict, adam: AdamParams) -> dict:
        """Rank 0: train the batch's mini-batches (forward_backward + optim_step each) on all
        ranks; the metrics minibatch_metrics gives for one process."""
        if self.size == 1:
            return minibatch_metrics(submit_minibatches(client, minibatches, loss_fn, loss_config, adam))
        minibatches = [m for m in minibatches if m]  # as submit_minibatches: no step for an empty one
        shares = [balanced_shares(m, self.size) for m in minibatches]
        work = [(loss_fn, loss_config, adam, [s[r] for s in shares]) for r in range(self.size)]
        return self._train(client, *self._scatter(work))

    def follow(self, client) -> None:
        """Every rank but 0: train the shares rank 0 sends, until it says stop."""
        while (work := self._scatter(None)) is not None:
            self._train(client, *work)

    def stop(self) -> None:
        """Rank 0, when the run is done: the other ranks' follow() returns."""
        if self.size > 1:
            self._scatter([None] * self.size)

    def close(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()

    def _scatter(self, items: list | None):
        out = [None]
        dist.scatter_object_list(out, items if self.rank == 0 else None, src=0, group=self.objects)
        return out[0]

    def _train(self, client, loss_fn: str, loss_config: dict, adam: AdamParams, shares: list[list[Datum]]) -> dict:
        # Every rank takes every optimizer step (each one all-reduces), with or without a share;
        # on a sharded base it also runs every pass (forward_backward on no data: idle passes).
        calls = [(client.forward_backward(s, loss_fn, loss_config) if s or self.place else None,
                  client.optim_step(adam)) for s in shares]
        results = [fb.result() if fb is not None else None for fb, _ in calls]  # idle passes' errors too
        mine = [r.metrics if s else None for s, r in zip(shares, results)]
        optim = [opt.result().metrics for _, opt in calls]  # the same on every rank: the summed gradient's norm
        gathered = [None] * self.size if self.rank == 0 else None
        dist.gather_object(mine, gathered, dst=0, group=self.objects)
        if self.rank != 0:
            return {}
        per_minibatch = [merge_shares([g[i] for g in gathered if g[i] is not None]) for i in range(len(shares))]
        record = merge_metrics(per_minibatch)
        record.update(merge_metrics(optim))
        record["optim/updates"] = float(len(shares))
        return record
