"""The `rlpipe` command.

    rlpipe run CONFIG.toml [--set learner.steps=20] [--resume]   all roles on this machine
    rlpipe buffer CONFIG.toml [--bind-public] [--run-id ID]      one role alone, e.g. each on its
    rlpipe learner CONFIG.toml [--connect BUFFER_HOST] [--resume]  own host (README: one host or
    rlpipe explorer CONFIG.toml [--connect HOST] --id NAME       several; pipeline/addresses.py)
    rlpipe stats RUN_DIR [--json]                                the run's accounting, across restarts
    rlpipe status RUN_DIR [--json]                               roles alive?, step, metrics, checkpoint, errors
    rlpipe plot RUN_DIR [--out FILE.png]                         the run's curves on one page
    rlpipe export RUN_DIR [--step N] (--merged OUT | --peft OUT) a merged HF model, or the adapter alone
    rlpipe serve --model DIR [--model NAME=DIR] --dir STATE_DIR  Tinker's HTTP API for the tinker SDK
    rlpipe demo                                                  SFT warm-up + async RL on arithmetic
    rlpipe tiny-model                                            build/print the embedded model
"""

from __future__ import annotations

import argparse
import asyncio
import faulthandler
import json
import logging
import signal
import sys

log = logging.getLogger("rlpipe")


def _parse_sets(items: list[str]) -> dict:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--set expects key=value, got {item!r}")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value  # a bare string
    return out


def _config(args):
    import msgspec

    from rlpipe.pipeline import identity
    from rlpipe.pipeline.addresses import for_role, public_bind_refusal
    from rlpipe.pipeline.config import load, resolve_train_unembed
    from rlpipe.pipeline.transport import is_loopback

    if getattr(args, "bind_public", False):  # a --set, so that `rlpipe run` hands it to its roles too
        args.set.append("addresses.bind_public=true")
    try:
        config = load(args.config, _parse_sets(args.set))
        if args.command in ("buffer", "learner", "explorer"):  # `rlpipe run` hands its roles the addresses it picked
            config = msgspec.structs.replace(config, addresses=for_role(config.addresses, args.command,
                                                                        getattr(args, "connect", None)))
        if args.command == "learner" and args.connect and is_loopback(config.addresses.control):
            log.warning("learner: addresses.control = %r is loopback: explorers on other hosts cannot reach it "
                        "(name this host's address there, with addresses.bind_public)", config.addresses.control)
        if (refusal := public_bind_refusal(config.addresses, args.command)) is not None:
            raise SystemExit(f"rlpipe {args.command}: {refusal}")
        if getattr(args, "run_id", None):
            try:
                identity.adopt_run_id(config.run_dir, args.run_id)
            except ValueError as err:  # not the config's fault
                raise SystemExit(f"rlpipe: {err}") from None
        if args.command == "explorer":  # the learner resolves it itself when it starts, `rlpipe run` before the roles
            resolve_train_unembed(config)  # what the sampler cannot serve is refused now, not after a step
        return config
    except (ValueError, FileNotFoundError) as err:  # a bad config: its message, not a traceback
        message = str(err).removeprefix(f"{args.config}: ")
        raise SystemExit(f"rlpipe: bad config {args.config}: {message}{_did_you_mean(message)}") from None


def _did_you_mean(message: str) -> str:
    """"; did you mean learner.steps?" for msgspec's "Object contains unknown field `stesp`"."""
    import difflib
    import re
    import typing

    from rlpipe.pipeline.config import Config, RunConfig

    match = re.search(r"unknown field `([^`]+)`", message)
    if match is None:
        return ""
    keys: dict[str, list[str]] = {}

    def walk(cls, prefix: str) -> None:
        for name, hint in typing.get_type_hints(cls).items():
            if isinstance(hint, type) and issubclass(hint, Config):
                walk(hint, f"{prefix}{name}.")
            else:
                keys.setdefault(name, []).append(prefix + name)

    walk(RunConfig, "")
    close = difflib.get_close_matches(match.group(1), keys, n=2, cutoff=0.6)
    dotted = [d for name in close for d in keys[name]]
    if not dotted:
        return "; every key is documented in rlpipe/pipeline/config.py"
    where = lambda d: f"{d.rsplit('.', 1)[1]} under [{d.rsplit('.', 1)[0]}]" if "." in d else f"{d} at the top"  # noqa: E731
    return f"; did you mean {' or '.join(where(d) for d in dotted)} (--set {dotted[0]}=...)?"


def cmd_buffer(args) -> None:
    from rlpipe.pipeline.buffer import run_buffer
    from rlpipe.pipeline.role import stop_on_sigterm

    config = _config(args)
    sys.exit(run_buffer(config, stop_on_sigterm()))


def cmd_learner(args) -> None:
    from rlpipe.pipeline.learner import run_learner
    from rlpipe.pipeline.role import stop_on_sigterm

    config = _config(args)
    stop_on_sigterm()
    sys.exit(run_learner(config, args.argv, resume=args.resume))


def cmd_explorer(args) -> None:
    from rlpipe.pipeline.explorer import Explorer
    from rlpipe.pipeline.launch import explorer_role
    from rlpipe.pipeline.role import EXIT_SIGTERM, stop_on_sigterm, supervised

    config = _config(args)
    if args.id is None:
        log.warning("explorer started without --id: a restart under another name cannot re-send this one's "
                    "unacknowledged groups (run_dir/<id>/outbox.sqlite); give a stable --id")
    stop_on_sigterm()
    try:
        # Explorer.run shuts down its own engine (SIGTERM included: it unwinds through run's
        # finally, which also gives the outbox a few seconds to deliver).
        with supervised(explorer_role(config.explorer.count, args.id), config):
            asyncio.run(Explorer(config, args.id).run())
    except KeyboardInterrupt:
        sys.exit(EXIT_SIGTERM)  # not the learner's Shutdown: a supervisor restarts it
    finally:
        from rlpipe.sampling import shutdown_engines

        shutdown_engines()  # engines of the shared registry, if anything in this process made one


def cmd_run(args) -> None:
    from rlpipe.pipeline.launch import run

    config = _config(args)
    sys.exit(run(config, args.config, args.set, resume=args.resume, quiet=args.quiet))


def cmd_stats(args) -> None:
    from rlpipe.pipeline.stats import format_stats, run_stats

    stats = run_stats(args.run_dir)
    print(json.dumps(stats, indent=1) if args.json else format_stats(stats))


def cmd_tiny(args) -> None:
    from rlpipe.testing.embedded import default_model_path

    print(default_model_path())


def cmd_serve(args) -> None:
    from rlpipe.serve import parse_models, serve

    options = {k: v for k, v in (("device", args.device), ("dtype", args.dtype)) if v is not None}
    if args.max_tokens_per_micro_batch:
        options["max_tokens_per_micro_batch"] = args.max_tokens_per_micro_batch
    engine = {"max_loaded_adapters": args.max_loaded_adapters, "max_lora_rank": args.max_lora_rank}
    serve(parse_models(args.model), args.dir, args.host, args.port, args.api_key, training_options=options,
          sampler_backend=args.sampler, engine_options=engine, max_body_bytes=args.max_body_mb << 20,
          session_timeout_s=args.session_timeout_s)


def cmd_plot(args) -> None:
    from rlpipe.cli.plot import main as plot_main

    plot_main(args)


def cmd_status(args) -> None:
    from rlpipe.cli.status import main as status_main

    status_main(args)


def cmd_export(args) -> None:
    from rlpipe.cli.export import main as export_main

    export_main(args)


def cmd_demo(args) -> None:
    from rlpipe.cli.demo import main as demo_main

    demo_main(args)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="rlpipe", description="asynchronous RL post-training for LMs")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, fn, help_text in (("run", cmd_run, "start buffer, learner and explorer on this machine"),
                                ("buffer", cmd_buffer, "run the experience buffer role"),
                                ("learner", cmd_learner, "run the learner role"),
                                ("explorer", cmd_explorer, "run an explorer role")):
        p = sub.add_parser(name, help=help_text)
        p.add_argument("config", help="TOML run config")
        p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="override a config field, e.g. learner.steps=20 (repeatable)")
        p.set_defaults(run=fn)
        if name in ("run", "learner"):
            p.add_argument("--resume", action="store_true", help="continue from the last checkpoint")
        if name == "run":
            p.add_argument("--quiet", action="store_true", help="no progress display, only errors and the end")
        if name in ("run", "buffer", "learner"):
            p.add_argument("--bind-public", action="store_true",
                           help="allow binding addresses other hosts can reach (= --set addresses.bind_public=true)")
        if name in ("buffer", "learner", "explorer"):
            p.add_argument("--run-id", default=None, metavar="ID",
                           help="the run's id on every host (each host's run_dir/run.json): give all roles the same")
        if name == "learner":
            p.add_argument("--connect", metavar="BUFFER_HOST",
                           help="the buffer's host: connect to addresses.batches there, on its configured port")
        if name == "explorer":
            p.add_argument("--connect", metavar="HOST", help="the buffer's and learner's host: connect to addresses."
                                                             "experience and .control there, on their configured ports")
            p.add_argument("--id", default=None, help="explorer name (default: random)")
    srv = sub.add_parser("serve", help="serve Tinker's HTTP API (official tinker SDK, tinker-cookbook) on local models")
    srv.add_argument("--host", default="127.0.0.1")
    srv.add_argument("--port", type=int, default=8000)
    srv.add_argument("--model", action="append", required=True, metavar="DIR|NAME=DIR",
                     help="a local Hugging Face model directory to serve (repeatable); NAME is what clients pass as base_model")
    srv.add_argument("--dir", required=True, help="state directory: checkpoints, sampler weights, the registry")
    srv.add_argument("--api-key", default=None, help="require this X-API-Key (default: accept any)")
    srv.add_argument("--sampler", choices=("vllm", "local"), default=None, help="sampling backend (default: vllm where installed)")
    srv.add_argument("--device", default=None, help="training device (default cuda where available, else cpu)")
    srv.add_argument("--dtype", default=None, help="base weights dtype (default bfloat16 on CUDA, float32 elsewhere)")
    srv.add_argument("--max-tokens-per-micro-batch", type=int, default=0)
    srv.add_argument("--max-loaded-adapters", type=int, default=8, help="sampler adapters kept loaded per engine")
    srv.add_argument("--session-timeout-s", type=float, default=900.0,
                     help="unload the models of a session silent (no heartbeat) this long")
    srv.add_argument("--max-body-mb", type=int, default=256, help="larger request bodies get 413")
    srv.add_argument("--max-lora-rank", type=int, default=32, help="largest LoRA rank the sampler serves")
    srv.set_defaults(run=cmd_serve)
    demo = sub.add_parser("demo", help="SFT warm-up, then async RL on arithmetic; prints accuracy before/after")
    demo.add_argument("--steps", type=int, default=None, help="RL steps (default from the demo config)")
    demo.add_argument("--runs-dir", default="runs")
    demo.add_argument("--seed", type=int, default=0, help="the warm-up's LoRA init and batch order (figures vary with it)")
    demo.add_argument("--quiet", action="store_true", help="no progress display, only the results")
    demo.set_defaults(run=cmd_demo)
    plot = sub.add_parser("plot", help="draw a run's curves (reward, accuracy, loss, KL, staleness, throughput) to a PNG")
    plot.add_argument("run_dir")
    plot.add_argument("--out", default=None, help="the PNG to write (default RUN_DIR/curves.png)")
    plot.set_defaults(run=cmd_plot)
    status = sub.add_parser("status", help="a run's roles (alive?), step, latest metrics, newest checkpoint, last errors")
    status.add_argument("run_dir")
    status.add_argument("--json", action="store_true", help="print JSON")
    status.set_defaults(run=cmd_status)
    export = sub.add_parser("export", help="write a run's adapter merged into the base model, or the adapter alone")
    export.add_argument("run_dir")
    export.add_argument("--step", type=int, default=None, help="the checkpoint of this learner step (default: newest)")
    what = export.add_mutually_exclusive_group(required=True)
    what.add_argument("--merged", metavar="OUT", help="a plain Hugging Face model directory, adapter merged in")
    what.add_argument("--peft", metavar="OUT", help="the PEFT adapter alone")
    export.set_defaults(run=cmd_export)
    stats = sub.add_parser("stats", help="a run's accounting across all restarts: groups finished, accepted, "
                                         "dropped by reason, lost; steps; restarts")
    stats.add_argument("run_dir")
    stats.add_argument("--json", action="store_true", help="print JSON")
    stats.set_defaults(run=cmd_stats)
    tiny = sub.add_parser("tiny-model", help="build (once) and print the path of the embedded tiny model")
    tiny.set_defaults(run=cmd_tiny)
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error, not just its line")
    for command in sub.choices.values():  # also after the command: `rlpipe run x.toml --debug`
        command.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # how `rlpipe learner` runs itself under torchrun
    if args.command in ("buffer", "learner", "explorer", "serve"):
        from rlpipe.pipeline.role import die_with_launcher

        die_with_launcher()
        from rlpipe.pipeline.distributed import die_with_agent

        die_with_agent()
    faulthandler.register(signal.SIGUSR1)  # `kill -USR1 PID` prints every thread's stack: for hangs
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.INFO,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if args.command in ("buffer", "learner", "explorer", "serve") or args.debug:
        args.run(args)  # a role's errors go to its log with their traceback (role.supervised)
        return
    try:
        args.run(args)
    except (KeyboardInterrupt, SystemExit):
        raise
    except Exception as err:  # one line for a person; the traceback with --debug
        log.debug("rlpipe %s failed", args.command, exc_info=True)
        from rlpipe.cli import console

        console.warn(f"rlpipe {args.command}: {type(err).__name__}: {err}  (--debug shows the traceback)")
        sys.exit(1)


if __name__ == "__main__":
    main()
