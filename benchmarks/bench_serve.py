"""`rlpipe serve` + the official tinker SDK against the same work in process.

    python benchmarks/bench_serve.py [--model tiny|qwen3-0.6b] [--reps 5] [--memory-model tiny|qwen3-0.6b]
                                     [--skip-sampling] [--skip-memory]

One `rlpipe serve` subprocess on loopback (cpu, float32 as the in-process client) is driven by
the tinker SDK from this process; the in-process side is rlpipe.training.client.TrainingClient and the
direct sampler rlpipe.sampling.create_sampling_client. Both sides do the same sequence of
calls on the same model, LoRA rank 8, seed 0, one call at a time: the training calls
interleaved (in process, remote; remote, in process; ...) so that load from elsewhere on the
machine falls on both alike; the sampling batches one side after the other (the in-process
vLLM engine is shut down before the server's starts: never two engines on the cores at once).

Printed, each figure with its ratio remote / in-process and its target:
  1. forward_backward (cross_entropy) on --datums x --seq-len random tokens (>= 4096): median
     seconds of --reps after --warmup (and the ratio of the fastest reps); the same for a
     forward_backward + optim_step pair. Target remote <= 1.2x in process.
  2. Fixed overhead per call: median of --overhead-reps 1-datum forwards of 8 tokens, remote
     minus in process, in ms; the floors: an optim_step with learning rate 0 on both sides
     and the REST round trip of get_training_run (no queue, no model).
  3. Sampling: --prompts prompts x --num-samples samples x --max-tokens tokens, temperature 1,
     seeded, issued at once (asyncio) with the step's LoRA adapter: median wall seconds of
     --reps batches after one warm-up batch, direct sampler vs the SDK. Target <= 1.2x.
  4. Memory (--memory-model, default the Qwen3-0.6B-shaped model, whose base weights
     dominate): a fresh server's RSS (its pid; its process tree too) idle, after 1 training
     client (+ one forward_backward), after 4 on the same base (each + one forward_backward).
     Target: total RSS with 4 clients < 1.3x with 1.
A markdown summary table closes the run, with PASS/FAIL per target.
"""

import argparse
import asyncio
import os
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ["TINKER_TELEMETRY"] = "0"
os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import numpy as np

from benchmarks.bench_realistic import rss_mb  # noqa: E402
from tests.serve_helpers import ServeProcess

RANK, SEED = 8, 0
ENGINE_OPTIONS = {"max_loaded_adapters": 8, "max_lora_rank": 32}  # what `rlpipe serve` passes by default
FB_TARGET, SAMPLE_TARGET, MEMORY_TARGET = 1.2, 1.2, 1.3


# --------------------------------------------------------------------------- helpers


def model_dir(name: str) -> str:
    if name == "tiny":
        from rlpipe.testing.embedded import default_model_path

        return str(default_model_path())
    from rlpipe.testing.families import QWEN3_0_6B, family_model_path

    return str(family_model_path("qwen3", **QWEN3_0_6B))


def usable_vocab(path: str) -> int:
    """Token ids below this are valid for the model and its tokenizer (the sampler checks both)."""
    import json

    from transformers import AutoTokenizer

    config = json.loads((Path(path) / "config.json").read_text())
    return min(config["vocab_size"], len(AutoTokenizer.from_pretrained(path)))


def descendants(pid: int) -> list[int]:
    """The server and every process it started: ServeProcess makes it a process-group leader."""
    from rlpipe.pipeline.launch import group_members

    return group_members(pid)


def paired(here, there, reps: int, warmup: int = 0) -> tuple[list[float], list[float]]:
    """Seconds of reps calls of each, interleaved (here, there; there, here; ...), one at a
    time, so that load from elsewhere on the machine falls on both sides alike."""
    for _ in range(warmup):
        here()
        there()
    times: tuple[list[float], list[float]] = ([], [])
    for i in range(reps):
        for side in ((0, 1) if i % 2 == 0 else (1, 0)):
            start = time.perf_counter()
            (here, there)[side]()
            times[side].append(time.perf_counter() - start)
    return times


def median_s(fn, reps: int, warmup: int = 0) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def result(x):
    """The SDK returns either the object or an APIFuture of it, depending on the call."""
    return x.result() if hasattr(x, "result") else x


class Server:
    """ServeProcess that, on stop, also ends what the server started (its vLLM engine) by pid."""

    def __init__(self, model: str, state_dir: Path):
        self.serve = ServeProcess(model, state_dir)
        self.seen: set[int] = set()

    def __enter__(self):
        self.serve.start(timeout_s=600)
        os.environ.update(self.serve.client_env())
        return self

    def tree(self) -> list[int]:
        pids = descendants(self.serve.proc.pid)
        self.seen.update(pids)
        return pids

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            print(f"(server log, last lines:)\n{self.serve.log_tail(30)}", file=sys.stderr)
        if self.serve.alive():
            self.tree()
        self.serve.stop()
        deadline = time.monotonic() + 15
        left = [p for p in self.seen if p != self.serve.proc.pid]
        while left and time.monotonic() < deadline:
            left = [p for p in left if Path(f"/proc/{p}").exists() and "Z" not in _state(p)]
            time.sleep(0.2)
        for pid in left:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return "Z"


# --------------------------------------------------------------------------- data


def tinker_datum(tokens):
    from tinker import types as T

    return T.Datum(model_input=T.ModelInput.from_ints(tokens[:-1].tolist()),
                   loss_fn_inputs={"target_tokens": tokens[1:].astype(np.int64),
                                   "weights": np.ones(len(tokens) - 1, dtype=np.float32)})


def rlpipe_datum(tokens):
    from rlpipe import types as R

    return R.Datum(model_input=R.ModelInput.from_ints(tokens[:-1].tolist()),
                   loss_fn_inputs={"target_tokens": tokens[1:].astype(np.int64),
                                   "weights": np.ones(len(tokens) - 1, dtype=np.float32)})


def token_rows(vocab: int, n: int, length: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, vocab, length + 1) for _ in range(n)]


# --------------------------------------------------------------------------- sections 1 + 2


def training_sections(mine: dict, theirs: dict, args) -> dict:
    """The same calls on both sides, interleaved; ops: fb(), pair(), fwd_small(), optim0().
    {name: (in-process seconds, remote seconds)}, all times."""
    out = {"fb": paired(mine["fb"], theirs["fb"], args.reps, args.warmup),
           "pair": paired(mine["pair"], theirs["pair"], args.reps, 1),
           "fwd_small": paired(mine["fwd_small"], theirs["fwd_small"], args.overhead_reps, 2),
           "optim0": paired(mine["optim0"], theirs["optim0"], args.overhead_reps, 2)}
    return out


def local_ops(client, big, small):
    from rlpipe import types as R

    fb = lambda: client.forward_backward(big, "cross_entropy").result()
    optim = lambda lr: client.optim_step(R.AdamParams(learning_rate=lr)).result()
    return {"fb": fb, "pair": lambda: (fb(), optim(1e-4)), "optim0": lambda: optim(0.0),
            "fwd_small": lambda: client.forward(small, "cross_entropy").result()}


def remote_ops(tc, big, small):
    from tinker import types as T

    fb = lambda: tc.forward_backward(big, "cross_entropy").result()
    optim = lambda lr: tc.optim_step(T.AdamParams(learning_rate=lr)).result()
    return {"fb": fb, "pair": lambda: (fb(), optim(1e-4)), "optim0": lambda: optim(0.0),
            "fwd_small": lambda: tc.forward(small, "cross_entropy").result()}


# --------------------------------------------------------------------------- section 3


def sample_batches(sample_async, prompts, num_samples: int, make_params, reps: int) -> tuple[float, list, list]:
    """One warm-up batch, then reps batches, each issued at once; median wall seconds,
    the per-batch times, and the last batch's tokens."""

    async def batch():
        return await asyncio.gather(*(sample_async(p, num_samples, make_params(i)) for i, p in enumerate(prompts)))

    async def main():
        await batch()
        times, last = [], None
        for _ in range(reps):
            start = time.perf_counter()
            last = await batch()
            times.append(time.perf_counter() - start)
        return times, last

    times, last = asyncio.run(main())
    tokens = [[list(s.tokens) for s in r.sequences] for r in last]
    return statistics.median(times), times, tokens


# --------------------------------------------------------------------------- section 4


def memory_section(args, work: Path, rows: list) -> None:
    import tinker

    path = model_dir(args.memory_model)
    vocab = usable_vocab(path)
    print(f"\n## 4. memory: training clients on one base ({args.memory_model}: {path})")
    data = [tinker_datum(t) for t in token_rows(vocab, 2, 128, seed=5)]

    def settle(server) -> tuple[float, float]:
        time.sleep(1.0)
        pid = server.serve.proc.pid
        return rss_mb([pid]), rss_mb(server.tree())

    with Server(path, work / "state-memory") as server:
        idle, idle_tree = settle(server)
        print(f"idle server: RSS {idle:.0f} MB (process tree {idle_tree:.0f} MB)")
        with tinker.ServiceClient() as svc:
            clients = []
            after = {}
            for i in range(4):
                start = time.perf_counter()
                tc = result(svc.create_lora_training_client(base_model=path, rank=RANK, seed=SEED + i))
                tc.forward_backward(data, "cross_entropy").result()
                clients.append(tc)
                took = time.perf_counter() - start
                after[i + 1] = settle(server)
                rss, tree = after[i + 1]
                print(f"after {i + 1} client(s) (+ one forward_backward, {took:.1f} s): RSS {rss:.0f} MB "
                      f"(+{rss - idle:.0f} over idle; tree {tree:.0f} MB)")
    one, four = after[1][0], after[4][0]
    ratio, delta_ratio = four / one, (four - idle) / max(one - idle, 1e-9)
    print(f"RSS 4 clients / 1 client: {ratio:.3f} (target < {MEMORY_TARGET})   "
          f"increase over idle, 4 / 1: {four - idle:.0f} / {one - idle:.0f} MB = {delta_ratio:.2f}")
    rows.append(("server RSS, 4 clients vs 1 (MB)", f"{four:.0f}", f"{one:.0f}", ratio, f"< {MEMORY_TARGET}",
                 ratio < MEMORY_TARGET))
    rows.append(("server RSS over idle, 4 clients vs 1 (MB)", f"{four - idle:.0f}", f"{one - idle:.0f}", delta_ratio,
                 "report", None))


# --------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", choices=("tiny", "qwen3-0.6b"), default="tiny", help="model of sections 1-3")
    parser.add_argument("--memory-model", choices=("tiny", "qwen3-0.6b"), default="qwen3-0.6b")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--overhead-reps", type=int, default=20)
    parser.add_argument("--datums", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--prompt-len", type=int, default=16)
    parser.add_argument("--num-samples", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--skip-sampling", action="store_true")
    parser.add_argument("--skip-memory", action="store_true")
    args = parser.parse_args()
    if args.datums * args.seq_len < 4096:
        print(f"note: {args.datums} x {args.seq_len} = {args.datums * args.seq_len} tokens, below the 4096 of the target")

    import tinker
    from tinker import types as T

    from rlpipe import types as R
    from rlpipe.training.client import TrainingClient

    rows: list[tuple] = []  # (figure, remote, in process, ratio, target, passed or None)
    t_start = time.time()
    with tempfile.TemporaryDirectory(prefix="bench-serve-") as tmp:
        work = Path(tmp)
        path = model_dir(args.model)
        vocab = usable_vocab(path)
        print(f"model {args.model}: {path} (token ids < {vocab}); LoRA rank {RANK}, seed {SEED}; "
              f"torch threads per process: {__import__('torch').get_num_threads()}; "
              f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs")
        big_rows = token_rows(vocab, args.datums, args.seq_len, seed=1)
        small_rows = token_rows(vocab, 1, 8, seed=2)
        with Server(path, work / "state") as server:
            print(f"server pid {server.serve.proc.pid} on {server.serve.url}")
            local = TrainingClient(path, R.LoraConfig(rank=RANK, seed=SEED), work / "local-ckpt")
            with tinker.ServiceClient() as svc:
                tc = result(svc.create_lora_training_client(base_model=path, rank=RANK, seed=SEED))
                rest = tinker.RestClient()  # base_url and api_key from the environment, as the ServiceClient
                times = training_sections(
                    local_ops(local, [rlpipe_datum(t) for t in big_rows], [rlpipe_datum(t) for t in small_rows]),
                    remote_ops(tc, [tinker_datum(t) for t in big_rows], [tinker_datum(t) for t in small_rows]), args)
                trivial = median_s(lambda: rest.get_training_run(tc.model_id).result(), args.overhead_reps, 2)
                local_adapter = local.save_weights_for_sampler("bench").result().path
                local.close()
                del local
                mine = {k: statistics.median(v[0]) for k, v in times.items()}
                theirs = {k: statistics.median(v[1]) for k, v in times.items()}

                tokens = args.datums * args.seq_len
                print(f"\n## 1. forward_backward, {args.datums} x {args.seq_len} = {tokens} tokens, cross_entropy "
                      f"(median of {args.reps} after {args.warmup} warm-ups, the two sides interleaved)")
                for key, label in (("fb", "forward_backward"), ("pair", "forward_backward + optim_step")):
                    ratio = theirs[key] / mine[key]
                    low = min(times[key][1]) / min(times[key][0])
                    print(f"{label:32s} in process {mine[key]:8.3f} s   SDK + server {theirs[key]:8.3f} s   "
                          f"ratio {ratio:.3f} (target <= {FB_TARGET}; of the fastest reps {low:.3f})   "
                          f"extra {1e3 * (theirs[key] - mine[key]):+.1f} ms")
                    print(f"{'':32s} each rep, in process: {', '.join(f'{t:.3f}' for t in times[key][0])}; "
                          f"SDK + server: {', '.join(f'{t:.3f}' for t in times[key][1])}")
                    rows.append((f"{label}, {tokens} tokens (s)", f"{theirs[key]:.3f}", f"{mine[key]:.3f}", ratio,
                                 f"<= {FB_TARGET}", ratio <= FB_TARGET))

                print(f"\n## 2. fixed overhead per call (median of {args.overhead_reps}, interleaved)")
                over = 1e3 * (theirs["fwd_small"] - mine["fwd_small"])
                print(f"forward, 1 datum x 8 tokens:     in process {1e3 * mine['fwd_small']:7.2f} ms   "
                      f"SDK + server {1e3 * theirs['fwd_small']:7.2f} ms   overhead {over:+.2f} ms per call")
                over0 = 1e3 * (theirs["optim0"] - mine["optim0"])
                print(f"optim_step, learning rate 0:     in process {1e3 * mine['optim0']:7.2f} ms   "
                      f"SDK + server {1e3 * theirs['optim0']:7.2f} ms   overhead {over0:+.2f} ms per call")
                print(f"REST get_training_run round trip (floor: HTTP, no queue, no model): {1e3 * trivial:.2f} ms")
                rows.append(("overhead per call: 1x8-token forward (ms)", f"{1e3 * theirs['fwd_small']:.2f}",
                             f"{1e3 * mine['fwd_small']:.2f}", theirs["fwd_small"] / mine["fwd_small"],
                             f"report: {over:+.2f} ms", None))
                rows.append(("overhead per call: optim_step lr 0 (ms)", f"{1e3 * theirs['optim0']:.2f}",
                             f"{1e3 * mine['optim0']:.2f}", theirs["optim0"] / mine["optim0"],
                             f"report: {over0:+.2f} ms", None))
                rows.append(("REST get_training_run round trip (ms)", f"{1e3 * trivial:.2f}", "-", None,
                             "report", None))

                if not args.skip_sampling:
                    from rlpipe.sampling import create_sampling_client, shutdown_engines

                    prompts = [t[: args.prompt_len] for t in token_rows(vocab, args.prompts, args.prompt_len, seed=3)]
                    total = args.prompts * args.num_samples
                    print(f"\n## 3. sampling: {args.prompts} prompts of {args.prompt_len} tokens x {args.num_samples} "
                          f"samples x <= {args.max_tokens} tokens, temperature 1, seeded, issued at once, with the "
                          f"step's LoRA adapter (median of {args.reps} batches after a warm-up batch)")
                    start = time.perf_counter()
                    sc_local = create_sampling_client(path, model_path=local_adapter, **ENGINE_OPTIONS)
                    print(f"direct sampler: engine started and adapter loaded in {time.perf_counter() - start:.1f} s")
                    try:
                        mine_s, mine_times, mine_tok = sample_batches(
                            sc_local.sample_async, [R.ModelInput.from_ints(p.tolist()) for p in prompts],
                            args.num_samples, lambda i: R.SamplingParams(max_tokens=args.max_tokens, temperature=1.0,
                                                                         seed=100 + i), args.reps)
                    finally:
                        shutdown_engines()  # never two vLLM engines on the 2 cores at once
                    start = time.perf_counter()
                    sampler_path = tc.save_weights_for_sampler("bench").result().path
                    sc = result(svc.create_sampling_client(model_path=sampler_path))
                    sc.sample(T.ModelInput.from_ints(prompts[0].tolist()), 1,
                              T.SamplingParams(max_tokens=1, temperature=1.0, seed=0)).result()
                    print(f"SDK: adapter saved, server engine started and first sample in "
                          f"{time.perf_counter() - start:.1f} s")
                    async def sdk_sample(prompt, n, params):  # sample() returns an awaitable APIFuture
                        return await sc.sample(prompt, n, params)

                    theirs_s, theirs_times, theirs_tok = sample_batches(
                        sdk_sample, [T.ModelInput.from_ints(p.tolist()) for p in prompts],
                        args.num_samples, lambda i: T.SamplingParams(max_tokens=args.max_tokens, temperature=1.0,
                                                                     seed=100 + i), args.reps)
                    n_mine = sum(len(s) for r in mine_tok for s in r)
                    n_theirs = sum(len(s) for r in theirs_tok for s in r)
                    ratio = theirs_s / mine_s
                    print(f"direct sampler {mine_s:7.3f} s ({', '.join(f'{t:.2f}' for t in mine_times)}; "
                          f"{n_mine} tokens in {total} samples, {n_mine / mine_s:.0f} tok/s)")
                    print(f"SDK + server   {theirs_s:7.3f} s ({', '.join(f'{t:.2f}' for t in theirs_times)}; "
                          f"{n_theirs} tokens in {total} samples, {n_theirs / theirs_s:.0f} tok/s)")
                    print(f"ratio {ratio:.3f} (target <= {SAMPLE_TARGET}; of the fastest batches "
                          f"{min(theirs_times) / min(mine_times):.3f}); same tokens on both sides: "
                          f"{'yes' if mine_tok == theirs_tok else 'no'}")
                    rows.append((f"sampling batch, {args.prompts}x{args.num_samples}x{args.max_tokens} (s)",
                                 f"{theirs_s:.3f}", f"{mine_s:.3f}", ratio, f"<= {SAMPLE_TARGET}", ratio <= SAMPLE_TARGET))
                    rss = rss_mb(server.tree())
                    print(f"server process tree RSS after sampling: {rss:.0f} MB")
        if not args.skip_memory:
            memory_section(args, work, rows)

    print(f"\n## summary ({time.time() - t_start:.0f} s; load average now {os.getloadavg()[0]:.2f})\n")
    print("| figure | SDK + server | in process | ratio | target | result |")
    print("|---|---|---|---|---|---|")
    for figure, remote, here, ratio, target, passed in rows:
        verdict = "-" if passed is None else ("PASS" if passed else "FAIL")
        print(f"| {figure} | {remote} | {here} | {'-' if ratio is None else f'{ratio:.3f}'} | {target} | {verdict} |")


if __name__ == "__main__":
    main()
