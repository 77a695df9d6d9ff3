"""The ZeroMQ addresses of a run: free ports picked for the ones the config leaves unset, a
check that the configured ones are not taken (another run on this machine), and what each role
started alone binds and connects to (several hosts).

Who binds what (stable roles bind, dynamic ones connect):
    buffer   binds experience, batches
    learner  binds control;              connects to batches (the buffer's host)
    explorer binds nothing;              connects to experience (buffer) and control (learner)
A role binds the address the config names, so on several hosts each binding role's address
names its own host (its LAN IP, or a wildcard), and opening it to other hosts must be asked
for: addresses.bind_public (public_bind_refusal)."""

from __future__ import annotations

import errno
import socket

import msgspec

from rlpipe.pipeline.config import DEFAULT_ADDRESSES, Addresses, RunConfig
from rlpipe.pipeline.transport import WILDCARD_HOSTS, is_loopback, tcp_host

BINDS = {"buffer": ("experience", "batches"), "learner": ("control",), "run": ("experience", "batches", "control")}
"""The addresses each command binds (`rlpipe run` starts all the roles on this host)."""
CONNECTS = {"explorer": ("experience", "control"), "learner": ("batches",)}
"""The addresses each role connects to: what `--connect HOST` moves to HOST."""


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
        if not address.startswith("tcp://") or not port.isdigit() or host in WILDCARD_HOSTS:
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


def for_role(addresses: Addresses, role: str, connect: str | None = None) -> Addresses:
    """The addresses of a role started alone (`rlpipe buffer | learner | explorer`): "" becomes
    the default; with connect=HOST the addresses it connects to (CONNECTS) are HOST's, on the
    configured ports; without it, one that names a wildcard ("tcp://0.0.0.0:5601": its binding
    role listens on every interface of this host) is reached through loopback."""
    resolved = addresses.resolved()
    moved = {}
    for name in CONNECTS.get(role, ()):
        address = getattr(resolved, name)
        host = tcp_host(address)
        if connect:
            if host is None:
                raise ValueError(f"--connect needs tcp addresses; addresses.{name} = {address!r}")
            moved[name] = f"tcp://{connect}:{address.rsplit(':', 1)[1]}"
        elif host in WILDCARD_HOSTS:
            moved[name] = f"tcp://127.0.0.1:{address.rsplit(':', 1)[1]}"
    return msgspec.structs.replace(resolved, **moved)


def public_bind_refusal(addresses: Addresses, role: str) -> str | None:
    """One line saying what to set, when `role` would bind an address that other hosts can
    reach and the config does not say addresses.bind_public; None when it may bind."""
    if addresses.bind_public:
        return None
    for name in BINDS.get(role, ()):
        address = getattr(addresses, name)
        if address and not is_loopback(address):  # "" = rlpipe run picks a loopback port
            return (f"addresses.{name} = {address!r} would be open to other hosts: set addresses.bind_public = "
                    f"true (or pass --bind-public) to allow it, or bind 127.0.0.1")
    return None
