"""The ZeroMQ addresses of a run on one host: free ports picked for the ones the config leaves
unset, and a check that the configured ones are not taken (another run on this machine)."""

from __future__ import annotations

import errno
import socket

import msgspec

from rlpipe.pipeline.config import DEFAULT_ADDRESSES, RunConfig


def pick_addresses(config: RunConfig) -> dict[str, str]:
    """Free loopback ports for the addresses the config leaves unset ("" = rlpipe run picks),
    as --set overrides for the roles. The probe sockets stay open until all are picked, so the
    three ports differ."""
    unset = [k for k in DEFAULT_ADDRESSES if not getattr(config.addresses, k)]
    probes = [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in unset]
    try:
        for probe in probes:
            probe.bind(("127.0.0.1", 0))
        return {f"addresses.{k}": f"tcp://127.0.0.1:{p.getsockname()[1]}" for k, p in zip(unset, probes)}
    finally:
        for probe in probes:
            probe.close()


def taken_address(config: RunConfig) -> str | None:
    """The first configured tcp address on this host that something already listens on."""
    for name in DEFAULT_ADDRESSES:
        address = getattr(config.addresses, name)
        host, _, port = address.removeprefix("tcp://").rpartition(":")
        if not address.startswith("tcp://") or not port.isdigit() or host in ("*", "0.0.0.0"):
            continue  # a wildcard is the role's to bind, and only when configured: never probed here
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            # As ZeroMQ binds: a port whose last connections linger in TIME_WAIT is free.
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind((host, int(port)))
            except OSError as err:
                if err.errno == errno.EADDRINUSE:  # other errors (a remote host) are the role's to report
                    return f"addresses.{name} = {address!r}"
    return None


def with_addresses(config: RunConfig, overrides: dict[str, str]) -> RunConfig:
    """config with the --set overrides of pick_addresses applied."""
    addresses = {k.split(".", 1)[1]: v for k, v in overrides.items()}
    return msgspec.structs.replace(config, addresses=msgspec.structs.replace(config.addresses, **addresses))
