"""The python tool's sandbox: limits, and refusing network access and writes outside its
folder, with every isolation layer on and with each layer on its own where the host has it."""

import asyncio
import os
import signal
import socket
import uuid

import pytest

from envs.sandbox import SandboxLimits, available_layers, landlock_abi, network_namespace_prefix, run_python

FAST = SandboxLimits(timeout_s=10, cpu_s=5, memory_mb=256)
AUDIT_ONLY = SandboxLimits(timeout_s=10, network_namespace=False, landlock=False)
NETNS_ONLY = SandboxLimits(timeout_s=10, landlock=False, audit_hook=False)
LANDLOCK_ONLY = SandboxLimits(timeout_s=10, network_namespace=False, audit_hook=False)
needs_netns = pytest.mark.skipif(network_namespace_prefix() is None, reason="unshare --net does not work here")
needs_landlock = pytest.mark.skipif(landlock_abi() < 1, reason="Landlock is not available on this kernel")
needs_landlock_net = pytest.mark.skipif(landlock_abi() < 4, reason="Landlock ABI < 4 has no TCP rules")


async def test_runs_code_and_allows_writes_inside_its_folder():
    code = ("import os\nos.makedirs('sub/dir')\nopen('sub/dir/a.txt', 'w').write('hello')\n"
            "os.rename('sub/dir/a.txt', 'b.txt')\nprint(open('b.txt').read(), os.getcwd())")
    result = await run_python(code, FAST)
    assert result.ok, result.render()
    text, folder = result.stdout.split()
    assert text == "hello"
    assert not os.path.exists(folder)  # the fresh folder is removed afterwards
    assert result.layers[:2] == ("process", "rlimits") and "audit_hook" in result.layers


@pytest.mark.parametrize("limits", [FAST, AUDIT_ONLY, pytest.param(LANDLOCK_ONLY, marks=needs_landlock)],
                         ids=["all_layers", "audit_hook", "landlock"])
@pytest.mark.parametrize("how", ["absolute", "dotdot", "symlink", "os_open", "rename_out"])
async def test_refuses_writes_outside_its_folder(tmp_path, limits, how):
    target = tmp_path / f"outside-{uuid.uuid4().hex}"
    code = {
        "absolute": f"open({str(target)!r}, 'w').write('x')",
        "dotdot": f"open('../' * 40 + {str(target)!r}.lstrip('/'), 'w').write('x')",
        "symlink": f"import os\nos.symlink({str(tmp_path)!r}, 'link')\nopen('link/{target.name}', 'w').write('x')",
        "os_open": f"import os\nos.close(os.open({str(target)!r}, os.O_WRONLY | os.O_CREAT))",
        "rename_out": f"open('inside', 'w').write('x')\nimport os\nos.rename('inside', {str(target)!r})",
    }[how]
    result = await run_python(code, limits)
    assert not target.exists()
    assert result.returncode == 1 and "PermissionError" in result.stderr, result.render()


async def test_refuses_writes_to_existing_files_outside(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("original")
    result = await run_python(f"open({str(victim)!r}, 'a').write('changed')", FAST)
    assert "PermissionError" in result.stderr
    assert victim.read_text() == "original"


@pytest.fixture
def listener():
    """A TCP server on the host's loopback that the sandbox must not reach."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(4)
    server.setblocking(False)
    yield server
    server.close()


def connected(server) -> bool:
    try:
        server.accept()[0].close()
        return True
    except BlockingIOError:
        return False


@pytest.mark.parametrize("limits", [
    FAST, AUDIT_ONLY, pytest.param(NETNS_ONLY, marks=needs_netns),
    pytest.param(LANDLOCK_ONLY, marks=needs_landlock_net),
], ids=["all_layers", "audit_hook", "netns", "landlock"])
async def test_refuses_network_access(listener, limits):
    port = listener.getsockname()[1]
    code = ("import socket\ntry:\n"
            f"    socket.create_connection(('127.0.0.1', {port}), timeout=2)\n    print('connected')\n"
            "except OSError as err:\n    print('refused', type(err).__name__, err)")
    result = await run_python(code, limits)
    assert result.stdout.startswith("refused"), result.render()
    assert not connected(listener)


async def test_refuses_processes_ctypes_and_signals():
    for code, event in [("import subprocess; subprocess.run(['true'])", "subprocess.Popen"),
                        ("import os; os.system('true')", "os.system"),
                        ("import ctypes", "ctypes.dlopen"),
                        ("import os; os.kill(os.getppid(), 0)", "os.kill"),
                        ("import resource; resource.setrlimit(resource.RLIMIT_CPU, (-1, -1))", "resource.setrlimit")]:
        result = await run_python(code, FAST)
        assert result.returncode == 1 and f"sandbox: {event}" in result.stderr, (code, result.render())


async def test_wall_clock_timeout():
    result = await run_python("import time\nprint('start', flush=True)\ntime.sleep(60)", SandboxLimits(timeout_s=1))
    assert result.timed_out and result.duration_s < 10
    assert result.stdout.strip() == "start"  # output before the kill is kept
    assert "[timed out after 1 s]" in result.render()


async def test_cpu_time_limit():
    result = await run_python("while True:\n    pass", SandboxLimits(timeout_s=30, cpu_s=1))
    assert not result.timed_out and result.returncode == -signal.SIGXCPU
    assert "CPU time limit" in result.render()


async def test_memory_limit():
    limits = SandboxLimits(memory_mb=200)
    result = await run_python("x = bytearray(400 * 1024 * 1024)", limits)
    assert result.returncode == 1 and "MemoryError" in result.stderr
    result = await run_python("x = bytearray(50 * 1024 * 1024)\nprint(len(x))", limits)
    assert result.ok and result.stdout.strip() == str(50 * 1024 * 1024)


async def test_output_is_truncated_and_errors_are_readable():
    result = await run_python("print('x' * 100_000)\nraise ValueError('boom')", SandboxLimits(max_output_chars=500))
    assert result.truncated and len(result.stdout) == 500
    assert result.stderr.rstrip().endswith("ValueError: boom")
    assert "<string>" not in result.stderr  # the bootstrap's frames are hidden
    assert result.render().endswith("[exit status 1]\n[output truncated]")
    syntax = await run_python("def f(:", FAST)
    assert "SyntaxError" in syntax.stderr and syntax.returncode == 1


async def test_environment_is_clean(monkeypatch):
    monkeypatch.setenv("RLPIPE_TEST_SECRET", "hunter2")
    result = await run_python("import os, sys\nprint(os.environ.get('RLPIPE_TEST_SECRET'), sys.flags.isolated)", FAST)
    assert result.stdout.split() == ["None", "1"]


def test_available_layers_follow_the_settings():
    assert available_layers(SandboxLimits(network_namespace=False, landlock=False, audit_hook=False)) == ("process", "rlimits")


def sandbox_children() -> list[int]:
    """This process's children running in a sandbox folder."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            if ppid == os.getpid() and "rlpipe-sandbox-" in os.readlink(f"/proc/{pid}/cwd"):
                found.append(int(pid))
        except OSError:  # the process ended while we looked
            continue
    return found


async def test_cancellation_kills_the_child():
    task = asyncio.create_task(run_python("import time\ntime.sleep(60)", SandboxLimits(timeout_s=60)))
    for _ in range(100):
        await asyncio.sleep(0.05)
        if children := sandbox_children():
            break
    assert children, "the sandbox process did not start"
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    for _ in range(100):
        if not sandbox_children():
            break
        await asyncio.sleep(0.05)
    assert not sandbox_children()
