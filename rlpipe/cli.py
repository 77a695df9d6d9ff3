"""The `rlpipe` command."""

from __future__ import annotations

import argparse


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="rlpipe", description="asynchronous RL post-training for LMs")
    sub = parser.add_subparsers(dest="command", required=True)
    tiny = sub.add_parser("tiny-model", help="build (once) and print the path of the embedded tiny model")
    tiny.set_defaults(run=lambda args: print(_tiny_path()))
    args = parser.parse_args(argv)
    args.run(args)


def _tiny_path() -> str:
    from rlpipe.tiny import default_model_path

    return str(default_model_path())


if __name__ == "__main__":
    main()
