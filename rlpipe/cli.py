"""The `rlpipe` command.

    rlpipe run CONFIG.toml [--set learner.steps=20] [--resume]   all roles on this machine
    rlpipe buffer CONFIG.toml                                    one role alone, e.g. on
    rlpipe learner CONFIG.toml [--resume]                        another host:
    rlpipe explorer CONFIG.toml --connect HOST                   (explorer -> HOST's buffer and learner)
    rlpipe demo                                                  SFT warm-up + async RL on arithmetic
    rlpipe tiny-model                                            build/print the embedded model
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import faulthandler
import json
import logging
import signal
import sys
import threading

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
    from rlpipe.pipeline.config import load, resolve_train_unembed

    overrides = _parse_sets(args.set)
    if getattr(args, "connect", None):
        overrides.update(_connect_overrides(args.connect))
    try:
        config = load(args.config, overrides)
        if args.command in ("run", "explorer"):  # the learner resolves it itself when it starts
            resolve_train_unembed(config)  # what the sampler cannot serve is refused now, not after a step
        return config
    except (ValueError, FileNotFoundError) as err:  # a bad config: its message, not a traceback
        raise SystemExit(f"rlpipe: bad config {args.config}: {err}") from None


def _connect_overrides(host: str) -> dict:
    from rlpipe.pipeline.config import Addresses

    defaults = Addresses()
    port = lambda address: address.rsplit(":", 1)[1]  # noqa: E731
    return {"addresses.experience": f"tcp://{host}:{port(defaults.experience)}",
            "addresses.control": f"tcp://{host}:{port(defaults.control)}"}


def _stop_on_sigterm() -> threading.Event:
    stop = threading.Event()

    def handler(signum, frame):
        stop.set()
        raise KeyboardInterrupt  # unwinds through finally blocks, closing sockets

    signal.signal(signal.SIGTERM, handler)
    return stop


@contextlib.contextmanager
def _role(role: str, config):
    """A role's error is logged with its traceback, recorded for `rlpipe run` to print
    (launch.record_failure), and ends the process at once with exit code 1."""
    try:
        yield
    except Exception as err:
        from rlpipe.pipeline.launch import record_failure

        log.error("%s failed: %s: %s", role, type(err).__name__, err, exc_info=True)
        record_failure(config.run_dir, role, err)
        sys.exit(1)


def cmd_buffer(args) -> None:
    from rlpipe.pipeline.buffer import serve
    from rlpipe.pipeline.config import vocab_size

    config = _config(args)
    stop = _stop_on_sigterm()
    stats = {}
    try:
        with _role("buffer", config):
            stats = serve(config.run_dir / "buffer", config.addresses.experience, config.addresses.batches,
                          vocab_size=vocab_size(config.model_path()), max_staleness=config.max_staleness,
                          drop_no_signal=config.buffer.drop_constant_reward_groups, stop=stop)
    except KeyboardInterrupt:
        pass
    finally:
        (config.run_dir / "buffer_stats.json").write_text(json.dumps(stats, indent=1))


def cmd_learner(args) -> None:
    from rlpipe.pipeline import transport
    from rlpipe.pipeline.learner import Learner
    from rlpipe.types import Shutdown

    config = _config(args)
    _stop_on_sigterm()
    with _role("learner", config):
        Learner(config, resume=args.resume).run()
    # Tell the buffer we are done so it writes its final stats and exits.
    client = transport.RequestClient(config.addresses.batches)
    try:
        client.request(Shutdown(reason="learner finished"), timeout_s=10)
    finally:
        client.close()


def cmd_explorer(args) -> None:
    from rlpipe.pipeline.explorer import Explorer

    config = _config(args)
    _stop_on_sigterm()
    try:
        with _role("explorer", config):  # logged and recorded before the engine shuts down
            asyncio.run(Explorer(config, args.id).run())
    except KeyboardInterrupt:
        pass
    finally:
        from rlpipe.sampling import shutdown_engines

        shutdown_engines()


def cmd_run(args) -> None:
    from rlpipe.pipeline.launch import run

    config = _config(args)
    sys.exit(run(config, args.config, args.set, resume=args.resume))


def cmd_tiny(args) -> None:
    from rlpipe.tiny import default_model_path

    print(default_model_path())


def cmd_demo(args) -> None:
    from rlpipe.demo import main as demo_main

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
        if name == "explorer":
            p.add_argument("--connect", metavar="HOST", help="the buffer's and learner's host (default ports)")
            p.add_argument("--id", default=None, help="explorer name (default: random)")
    demo = sub.add_parser("demo", help="SFT warm-up, then async RL on arithmetic; prints accuracy before/after")
    demo.add_argument("--steps", type=int, default=None, help="RL steps (default from the demo config)")
    demo.add_argument("--runs-dir", default="runs")
    demo.set_defaults(run=cmd_demo)
    tiny = sub.add_parser("tiny-model", help="build (once) and print the path of the embedded tiny model")
    tiny.set_defaults(run=cmd_tiny)
    args = parser.parse_args(argv)
    faulthandler.register(signal.SIGUSR1)  # `kill -USR1 PID` prints every thread's stack: for hangs
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    args.run(args)


if __name__ == "__main__":
    main()
