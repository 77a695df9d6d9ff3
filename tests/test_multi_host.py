"""Roles on several hosts, for real, on one machine: two network namespaces joined by a veth pair.

    namespace A ("the buffer host", 10.77.0.1)      namespace B ("the explorer host", 10.77.0.2)
      rlpipe buffer  --bind-public                    rlpipe explorer --id explorer-b1
      rlpipe learner --bind-public                    rlpipe explorer --id explorer-b2 --connect 10.77.0.1

Both hosts read one config whose [addresses] name A's veth address on non-default ports; each
namespace has only its loopback and its end of the veth, so whatever reaches the buffer from B
crossed the veth. Each host has its own runs_dir (no shared disk), and all roles get the same
--run-id, as on real hosts. The explorers use the local sampler (explorer.sampler = "local"):
two vLLM engines on this machine's 2 CPU cores would take minutes to start and crawl; the
transport, the addresses and the delivery under test are the same with either sampler.

Needs root (CAP_NET_ADMIN) and iproute2's `ip`: skipped, with the reason, where namespaces
cannot be made.
"""

import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from argparse import Namespace
from pathlib import Path

import pytest

from rlpipe.pipeline.addresses import for_role, public_bind_refusal
from rlpipe.pipeline.config import Addresses
from rlpipe.pipeline.transport import AddressNotHere, RequestServer, is_loopback

pytestmark = pytest.mark.slow  # processes, engines or servers: not in the quick tier (pytest -m "not slow")

REPO = Path(__file__).resolve().parent.parent
HOST_A, HOST_B = "10.77.0.1", "10.77.0.2"
PORTS = (6101, 6102, 6103)  # not the defaults (5601-5603): --connect must keep these
STEPS = 3


# --------------------------------------------------------------------------- the binding rules (no namespaces)


def test_binding_beyond_loopback_must_be_asked_for():
    for address in ("tcp://127.0.0.1:1", "tcp://127.3.0.1:1", "tcp://localhost:1", "tcp://[::1]:1", "tcp://lo:1",
                    "ipc:///tmp/x", "inproc://x"):
        assert is_loopback(address), address
    for address in ("tcp://0.0.0.0:1", "tcp://*:1", "tcp://10.0.0.5:1", "tcp://eth0:1", "tcp://[::]:1"):
        assert not is_loopback(address), address
    lan = Addresses(experience="tcp://10.0.0.5:6101", batches="tcp://10.0.0.5:6102", control="tcp://10.0.0.6:6103")
    refusal = public_bind_refusal(lan, "buffer")
    assert refusal is not None and "addresses.experience" in refusal and "bind_public = true" in refusal
    assert "--bind-public" in refusal and "\n" not in refusal
    assert "addresses.control" in public_bind_refusal(lan, "learner")
    assert public_bind_refusal(lan, "explorer") is None  # it binds nothing
    assert public_bind_refusal(Addresses(bind_public=True, control="tcp://*:6103"), "learner") is None
    assert public_bind_refusal(Addresses(), "run") is None  # "" = rlpipe run picks loopback ports


def test_connect_keeps_the_configured_ports_for_explorers_and_the_learner():
    lan = Addresses(experience="tcp://0.0.0.0:6101", batches="tcp://0.0.0.0:6102", control="tcp://10.0.0.6:6103")
    explorer = for_role(lan, "explorer", "buffer-host")
    assert (explorer.experience, explorer.control) == ("tcp://buffer-host:6101", "tcp://buffer-host:6103")
    learner = for_role(lan, "learner", "buffer-host")
    assert (learner.batches, learner.control) == ("tcp://buffer-host:6102", "tcp://10.0.0.6:6103")  # binds its own
    assert for_role(lan, "buffer", "x").experience == "tcp://0.0.0.0:6101"  # binds: --connect does not apply
    # Without --connect, a wildcard is the binding role listening on this host: reached through loopback.
    assert for_role(lan, "explorer").experience == "tcp://127.0.0.1:6101"
    assert for_role(Addresses(), "explorer", "h").experience == "tcp://h:5601"  # unset: the default ports


def test_the_cli_refuses_a_public_bind_in_one_line(tmp_path):
    from rlpipe.cli import main as cli

    config = tmp_path / "hosts.toml"
    config.write_text(f'runs_dir = "{tmp_path}"\n[addresses]\nexperience = "tcp://0.0.0.0:6101"\n')
    args = Namespace(command="buffer", config=str(config), set=[], bind_public=False, run_id=None)
    with pytest.raises(SystemExit) as refused:
        cli._config(args)
    assert str(refused.value) == ("rlpipe buffer: addresses.experience = 'tcp://0.0.0.0:6101' would be open to other "
                                  "hosts: set addresses.bind_public = true (or pass --bind-public) to allow it, "
                                  "or bind 127.0.0.1")
    assert cli._config(Namespace(**{**vars(args), "bind_public": True})).addresses.bind_public


def test_run_id_is_shared_and_a_different_one_refused(tmp_path):
    from rlpipe.pipeline.identity import adopt_run_id, read_run_id, run_id

    adopt_run_id(tmp_path / "run", "exp-7")
    adopt_run_id(tmp_path / "run", "exp-7")  # the same id again: fine
    assert read_run_id(tmp_path / "run") == "exp-7" and run_id(tmp_path / "run") == "exp-7"
    with pytest.raises(ValueError, match="holds run 'exp-7', not --run-id 'exp-8'"):
        adopt_run_id(tmp_path / "run", "exp-8")
    with pytest.raises(ValueError, match="use 1-64 letters"):
        adopt_run_id(tmp_path / "other", "a b")
    assert not (tmp_path / "other" / "run.json").exists()
    made = run_id(tmp_path / "fresh")  # made on first use, then kept
    assert len(made) == 12 and run_id(tmp_path / "fresh") == made


def test_binding_another_hosts_address_is_unrecoverable():
    with pytest.raises(AddressNotHere, match="no interface of this host has that address"):
        RequestServer("tcp://192.0.2.1:6101")  # TEST-NET-1: no host has it


# --------------------------------------------------------------------------- two namespaces


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True, timeout=20)


@pytest.fixture
def namespaces():
    """(namespace A, namespace B, A's veth) joined by a veth pair; removed afterwards."""
    if shutil.which("ip") is None:
        pytest.skip("network namespaces unavailable: no `ip` command (iproute2)")
    tag = f"{os.getpid() % 100000}"
    ns_a, ns_b, veth_a, veth_b = f"rlpA{tag}", f"rlpB{tag}", f"rlpa{tag}", f"rlpb{tag}"
    made: list[str] = []
    try:
        try:
            _ip("netns", "add", ns_a)
        except subprocess.CalledProcessError as err:
            pytest.skip(f"network namespaces unavailable (needs root / CAP_NET_ADMIN): {err.stderr.strip()}")
        made.append(ns_a)
        _ip("netns", "add", ns_b)
        made.append(ns_b)
        _ip("link", "add", veth_a, "type", "veth", "peer", "name", veth_b)
        made.append(veth_a)
        _ip("link", "set", veth_a, "netns", ns_a)
        _ip("link", "set", veth_b, "netns", ns_b)
        for ns, veth, address in ((ns_a, veth_a, HOST_A), (ns_b, veth_b, HOST_B)):
            _ip("-n", ns, "addr", "add", f"{address}/24", "dev", veth)
            _ip("-n", ns, "link", "set", veth, "up")
            _ip("-n", ns, "link", "set", "lo", "up")
        yield ns_a, ns_b, veth_a
    finally:
        for ns in (n for n in made if n in (ns_a, ns_b)):  # deleting a namespace deletes its veth end
            subprocess.run(["ip", "netns", "del", ns], check=False, capture_output=True, timeout=20)
        if veth_a in made:  # still here if moving it into A failed
            subprocess.run(["ip", "link", "del", veth_a], check=False, capture_output=True, timeout=20)


def _link_bytes(ns: str, link: str) -> tuple[int, int]:
    out = subprocess.run(["ip", "-n", ns, "-s", "-j", "link", "show", link], check=True, capture_output=True,
                         text=True, timeout=20).stdout
    stats = json.loads(out)[0]["stats64"]
    return stats["rx"]["bytes"], stats["tx"]["bytes"]


def _write_config(path: Path) -> Path:
    """The one config of every host: the buffer's and learner's addresses on host A."""
    experience, batches, control = (f"tcp://{HOST_A}:{p}" for p in PORTS)
    path.write_text("\n".join([
        'name = "hosts"', "max_staleness = 1", "groups_per_batch = 4", 'base_model = ""',
        "[dataset]", 'factory = "envs.toy:DigitsDataset"', "args = { group_size = 4 }",
        "[explorer]", 'sampler = "local"', "concurrency = 4", "max_tokens = 8", "episode_timeout_s = 60",
        "first_weights_timeout_s = 80",
        "[learner]", f"steps = {STEPS}", "rank = 8", "learning_rate = 2e-3", "checkpoint_every = 10",
        "batch_timeout_s = 80",
        "[addresses]", f'experience = "{experience}"', f'batches = "{batches}"', f'control = "{control}"',
    ]) + "\n")
    return path


def test_roles_on_two_hosts_over_a_veth(namespaces, tmp_path, tiny_model_path):
    from rlpipe.pipeline.launch import group_members
    from rlpipe.pipeline.outbox import read_outbox_stats, unacked_ids
    from rlpipe.pipeline.store import DB_NAME, read_stats, seen_group_ids

    ns_a, ns_b, veth_a = namespaces
    config = _write_config(tmp_path / "hosts.toml")
    host_a, host_b = tmp_path / "host-a", tmp_path / "host-b"  # each host its own disk
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    env.pop("RLPIPE_LAUNCHER_PID", None)
    logs = tmp_path / "logs"
    logs.mkdir()
    procs: dict[str, subprocess.Popen] = {}

    def start(name: str, ns: str, runs_dir: Path, *args: str) -> None:
        cmd = ["ip", "netns", "exec", ns, sys.executable, "-m", "rlpipe.cli", *args, str(config),
               "--set", f"runs_dir={runs_dir}", "--run-id", "netns-run"]
        with open(logs / f"{name}.log", "wb") as log:  # `ip netns exec` execs: the pid is the role's
            procs[name] = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                                           start_new_session=True)  # its own process group

    def log_tails() -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-2500:]}" for p in sorted(logs.iterdir()))

    before = _link_bytes(ns_a, veth_a)
    try:
        start("buffer", ns_a, host_a, "buffer", "--bind-public")
        start("explorer-b1", ns_b, host_b, "explorer", "--id", "explorer-b1")
        start("explorer-b2", ns_b, host_b, "explorer", "--id", "explorer-b2", "--connect", HOST_A)
        # The learner last, once both engines are up: started together, one explorer could
        # take every group of the run's few steps while the other still loads its model on a
        # loaded machine (seen: 14 groups to 0), and the test wants both on the wire.
        ready_by = time.monotonic() + 120
        while not all("engine for" in (logs / f"{e}.log").read_text(errors="replace")
                      for e in ("explorer-b1", "explorer-b2")):
            assert time.monotonic() < ready_by, f"the explorers' engines did not start\n{log_tails()}"
            assert all(p.poll() is None for p in procs.values()), f"a role exited early\n{log_tails()}"
            time.sleep(0.5)
        start("learner", ns_a, host_a, "learner", "--bind-public")
        deadline = time.monotonic() + 85
        while time.monotonic() < deadline and any(p.poll() is None for p in procs.values()):
            if procs["learner"].poll() not in (None, 0):
                break
            time.sleep(0.5)
        codes = {name: p.poll() for name, p in procs.items()}
        # The learner finished; the buffer took its Shutdown, the explorers the learner's.
        assert codes == dict.fromkeys(procs, 0), f"{codes}\n{log_tails()}"
    finally:
        for p in procs.values():
            for sig in (signal.SIGTERM, signal.SIGKILL):
                if not group_members(p.pid):
                    break
                os.killpg(p.pid, sig)
                try:
                    p.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    pass
            p.wait(timeout=10)
    for name, p in procs.items():
        assert group_members(p.pid) == [], f"{name} left processes behind"
    run_a, run_b = host_a / "hosts", host_b / "hosts"
    steps = [json.loads(line)["step"] for line in (run_a / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, STEPS + 1))

    # Both explorers' groups reached the buffer, and none was lost on the way.
    buffer_dir = run_a / "buffer"
    buffer = read_stats(buffer_dir)
    with sqlite3.connect(f"file:{buffer_dir / DB_NAME}?mode=ro", uri=True) as db:
        by_explorer = dict(db.execute("SELECT explorer, COUNT(*) FROM decisions GROUP BY explorer"))
    finished = waiting = 0
    for explorer in ("explorer-b1", "explorer-b2"):
        own = read_outbox_stats(run_b / explorer)
        pending = unacked_ids(run_b / explorer)
        waiting += len(pending - seen_group_ids(buffer_dir, pending))
        finished += own["finished"]
        assert by_explorer.get(explorer, 0) > 0, f"no group of {explorer} reached the buffer: {by_explorer}"
        assert json.loads((run_b / explorer / "stats.json").read_text())["outbox"]["finished"] == own["finished"]
    assert finished == buffer["received"] + waiting, (finished, buffer, waiting)  # nothing lost
    assert buffer["received"] == buffer["accepted"] + sum(n for r, n in buffer["dropped"].items() if r != "stale")
    assert buffer["run_id"] == "netns-run" and buffer["accepted"] >= STEPS * 4

    # It crossed the veth: groups in (several KB each), adapters out to two explorers.
    after = _link_bytes(ns_a, veth_a)
    received, sent = after[0] - before[0], after[1] - before[1]
    assert received > 20_000 and sent > 100_000, (received, sent)
