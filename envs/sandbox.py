"""Run model-written Python in a separate, limited process (the `python` tool).

Layers, outermost first; each one that is available is applied, and `SandboxResult.layers`
says which ones were:

1. A separate process (`python -I -S -B`: no site-packages, no environment variables, no
   user site) in a fresh temporary folder that is its cwd, HOME and TMPDIR, with a clean
   environment, stdin from /dev/null, its own session (the whole process group is killed on
   timeout) and a wall-clock timeout.
2. rlimits set in preexec_fn: RLIMIT_AS (memory), RLIMIT_CPU (CPU seconds; SIGXCPU past it),
   RLIMIT_FSIZE (largest file), RLIMIT_NOFILE, no core dumps.
3. "netns": a fresh network namespace (`unshare --net`, or `unshare --map-root-user --net`
   for an unprivileged user), so there is no interface but a downed loopback: nothing,
   not even the host's localhost, can be reached. Probed once; skipped where unshare fails.
4. "landlock" (Linux >= 5.13 with Landlock enabled): a kernel-enforced rule set applied in
   preexec_fn, so it holds from the first instruction of the child on and ctypes is never
   loaded in the model's interpreter: creating, writing, truncating, renaming or removing
   files is allowed only beneath the sandbox folder (reads stay allowed everywhere), TCP
   bind/connect are denied (ABI >= 4), signals and abstract unix sockets cannot leave the
   sandbox (ABI >= 6). If the probe says Landlock works but it cannot be applied, run_python
   raises SandboxSetupError instead of running the code (fail closed).
5. "audit_hook": a PEP 578 audit hook installed before the model's code: socket
   connect/bind/DNS and non-unix sockets, subprocess/exec/fork/spawn, ctypes, raising rlimits,
   signalling other processes and writes outside the folder raise PermissionError with a
   clear message. It is always on by default because it gives the model readable errors,
   but it runs inside the model's interpreter and is NOT a security boundary on its own
   (PEP 578 says so; e.g. os.open(..., dir_fd=) slips past its path check).

Limits: reads are not restricted (the code can read any file the trainer's user can read);
without netns AND landlock only the audit hook stands between the code and the network; the
number of files written inside the folder is bounded only by time and RLIMIT_FSIZE per file;
the code runs as the trainer's user. For untrusted code at scale, run the trainer itself in
a container or VM. Only the standard library is importable.
"""

from __future__ import annotations

import asyncio
import functools
import os
import platform
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass


class SandboxSetupError(RuntimeError):
    """The sandbox itself could not be set up: a broken host, not the model's fault, so it
    is raised (the group fails visibly) instead of being shown to the model."""


@dataclass(frozen=True)
class SandboxLimits:
    timeout_s: float = 5.0
    """Wall-clock limit; the process group is killed after it."""
    cpu_s: int = 5
    """CPU-time limit (RLIMIT_CPU); the kernel sends SIGXCPU past it."""
    memory_mb: int = 512
    """Address-space limit (RLIMIT_AS); allocations past it raise MemoryError."""
    max_file_mb: int = 16
    """Largest file the code may write (RLIMIT_FSIZE)."""
    max_open_files: int = 64
    max_output_chars: int = 2000
    """stdout keeps its head, stderr its tail (where the traceback ends), each this long."""
    network_namespace: bool = True
    """Use the "netns" layer where the host allows it."""
    landlock: bool = True
    """Use the "landlock" layer where the kernel has it."""
    audit_hook: bool = True
    """Use the "audit_hook" layer. Switch layers off only to test the others on their own."""


@dataclass
class SandboxResult:
    stdout: str
    stderr: str
    returncode: int | None
    timed_out: bool
    truncated: bool
    duration_s: float
    layers: tuple[str, ...]
    limits: SandboxLimits

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and not self.timed_out

    def render(self) -> str:
        """The text the model sees as the tool's result."""
        parts = [p.rstrip("\n") for p in (self.stdout, self.stderr) if p.strip()]
        if self.timed_out:
            parts.append(f"[timed out after {self.limits.timeout_s:g} s]")
        elif self.returncode == -signal.SIGXCPU:
            parts.append(f"[killed: CPU time limit of {self.limits.cpu_s} s exceeded]")
        elif self.returncode == -signal.SIGXFSZ:
            parts.append(f"[killed: file size limit of {self.limits.max_file_mb} MB exceeded]")
        elif self.returncode:
            parts.append(f"[exit status {self.returncode}]")
        if self.truncated:
            parts.append("[output truncated]")
        return "\n".join(parts) if parts else "(no output)"


# --------------------------------------------------------------------------- probes


@functools.cache
def network_namespace_prefix() -> tuple[str, ...] | None:
    """The command prefix that runs a program in a fresh network namespace, or None."""
    unshare = shutil.which("unshare")
    if unshare is None or sys.platform != "linux":
        return None
    for prefix in ((unshare, "--net"), (unshare, "--map-root-user", "--net")):
        try:
            probe = subprocess.run([*prefix, "--", sys.executable, "-I", "-S", "-c", "pass"],
                                   capture_output=True, timeout=20)
        except (OSError, subprocess.TimeoutExpired):
            continue
        if probe.returncode == 0:
            return prefix
    return None


@functools.cache
def landlock_abi() -> int:
    """The kernel's Landlock ABI version; 0 where Landlock is missing or disabled."""
    # landlock_create_ruleset is syscall 444 in the generic table that both arches use.
    if sys.platform != "linux" or platform.machine() not in ("x86_64", "aarch64"):
        return 0
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    abi = libc.syscall(ctypes.c_long(444), None, ctypes.c_size_t(0), ctypes.c_uint32(1))
    return max(int(abi), 0)


def available_layers(limits: SandboxLimits = SandboxLimits()) -> tuple[str, ...]:
    layers = ["process", "rlimits"]
    if limits.network_namespace and network_namespace_prefix() is not None:
        layers.append("netns")
    if limits.landlock and landlock_abi() > 0:
        layers.append("landlock")
    if limits.audit_hook:
        layers.append("audit_hook")
    return tuple(layers)


# --------------------------------------------------------------------------- the child

# Runs as `python -I -S -B -c BOOTSTRAP <audit hook 0|1>` with the sandbox folder as cwd;
# the model's code is main.py in that folder. The kernel layers are already in place.
BOOTSTRAP = r'''
import os, sys

def audit_hook(root):
    import socket
    realpath, fspath, fsdecode, sep, me = os.path.realpath, os.fspath, os.fsdecode, os.sep, os.getpid()
    write_flags = os.O_WRONLY | os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_TRUNC
    denied = {"subprocess.Popen", "os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.fork",
              "os.forkpty", "resource.setrlimit", "resource.prlimit", "sys.remote_exec"}
    # event: (positions of paths it changes, positions of dir_fd arguments)
    paths = {"os.remove": ((0,), (1,)), "os.rmdir": ((0,), (1,)), "os.mkdir": ((0,), (2,)),
             "os.rename": ((0, 1), (2, 3)), "os.link": ((0, 1), (2, 3)), "os.symlink": ((1,), (2,)),
             "os.truncate": ((0,), ()), "os.chmod": ((0,), (2,)), "os.chown": ((0,), (3,)),
             "os.utime": ((0,), (3,)), "os.setxattr": ((0,), ()), "os.removexattr": ((0,), ()),
             "os.chflags": ((0,), ()), "os.lchflags": ((0,), ()), "shutil.rmtree": ((0,), (1,))}
    def inside(path):
        if isinstance(path, int):
            return True  # an already open descriptor
        p = realpath(fspath(path))
        p = fsdecode(p) if isinstance(p, bytes) else p
        return p == root or p.startswith(root + sep) or p == "/dev/null"
    def refuse(what):
        raise PermissionError(f"sandbox: {what} is not allowed")
    def hook(event, args):
        if event == "open":
            path, mode, flags = args
            writing = (isinstance(mode, str) and any(c in mode for c in "wax+")) or (flags or 0) & write_flags
            if writing and not inside(path):
                refuse(f"writing outside the sandbox folder ({path!r})")
        elif event in paths:
            changed, dir_fds = paths[event]
            if any(args[i] not in (None, -1) for i in dir_fds if i < len(args)):  # -1: no dir_fd
                refuse(f"{event} with dir_fd")
            for i in changed:
                if not inside(args[i]):
                    refuse(f"{event} outside the sandbox folder ({args[i]!r})")
        elif event.startswith("socket."):
            if event == "socket.__new__" and args[1] == socket.AF_UNIX:
                return  # socketpair() for asyncio's self-pipe; unix connect/bind stay denied
            refuse(f"network access ({event})")
        elif event.startswith("ctypes.") or event in denied:
            refuse(event)
        elif event in ("os.kill", "os.killpg") and args[0] != me:
            refuse(f"{event} of another process")
    sys.addaudithook(hook)

def main():
    if sys.argv[1] == "1":
        audit_hook(os.path.realpath(os.getcwd()))  # if this raises, the code never runs
    with open("main.py", encoding="utf-8") as f:
        source = f.read()
    sys.argv = ["main.py"]
    import traceback
    try:
        exec(compile(source, "main.py", "exec"), {"__name__": "__main__", "__builtins__": __builtins__})
    except SystemExit:
        raise
    except BaseException as err:
        report = traceback.TracebackException(type(err), err, err.__traceback__.tb_next)
        report.stack = traceback.StackSummary.from_list([f for f in report.stack if f.filename != "<string>"])
        sys.stderr.write("".join(report.format()))  # without this bootstrap's frames
        sys.exit(1)

main()
'''


def _landlock_rules(folder: str):
    """A prepared Landlock rule set: writes only beneath `folder`, no TCP, scoped signals
    and abstract unix sockets. Returns the function that applies it to the calling process
    (in preexec_fn, so the model's interpreter never has ctypes loaded)."""
    import ctypes

    abi = landlock_abi()
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    # write_file, remove_dir, remove_file, make_char/dir/reg/sock/fifo/block/sym,
    # refer (ABI 2), truncate (ABI 3); reading and executing stay unrestricted.
    fs = (1 << 1) | sum(1 << i for i in range(4, 13))
    fs |= (1 << 13 if abi >= 2 else 0) | (1 << 14 if abi >= 3 else 0)
    net = 0b11 if abi >= 4 else 0  # bind_tcp, connect_tcp: handled, and no rule allows a port
    scoped = 0b11 if abi >= 6 else 0  # abstract unix sockets, signals

    class RulesetAttr(ctypes.Structure):
        _fields_ = [("fs", ctypes.c_uint64), ("net", ctypes.c_uint64), ("scoped", ctypes.c_uint64)]

    class PathBeneath(ctypes.Structure):
        _pack_ = 1
        _fields_ = [("allowed", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]

    attr = RulesetAttr(fs, net, scoped)
    size = 8 if abi < 4 else (16 if abi < 6 else 24)

    def call(number: int, *args) -> int:
        result = libc.syscall(ctypes.c_long(number), *args)
        if result < 0:
            raise OSError(ctypes.get_errno(), f"landlock syscall {number} failed")
        return result

    def apply() -> None:
        ruleset = call(444, ctypes.byref(attr), ctypes.c_size_t(size), ctypes.c_uint32(0))
        parent = os.open(folder, os.O_PATH | os.O_CLOEXEC)
        call(445, ctypes.c_int(ruleset), ctypes.c_int(1), ctypes.byref(PathBeneath(fs, parent)), ctypes.c_uint32(0))
        if libc.prctl(38, 1, 0, 0, 0) != 0:  # PR_SET_NO_NEW_PRIVS, required by restrict_self
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_NO_NEW_PRIVS) failed")
        call(446, ctypes.c_int(ruleset), ctypes.c_uint32(0))
        os.close(parent)
        os.close(ruleset)

    return apply


def _child_setup(limits: SandboxLimits, folder: str, landlock: bool):
    mb = 1024 * 1024
    settings = [
        (resource.RLIMIT_AS, limits.memory_mb * mb, limits.memory_mb * mb),
        (resource.RLIMIT_CPU, limits.cpu_s, limits.cpu_s + 1),
        (resource.RLIMIT_FSIZE, limits.max_file_mb * mb, limits.max_file_mb * mb),
        (resource.RLIMIT_NOFILE, limits.max_open_files, limits.max_open_files),
        (resource.RLIMIT_CORE, 0, 0),
    ]
    restrict = _landlock_rules(folder) if landlock else None

    def preexec() -> None:  # runs in the forked child, before exec
        for which, soft, hard in settings:
            resource.setrlimit(which, (soft, hard))
        if restrict is not None:
            restrict()

    return preexec


class _Capture:
    """Reads a pipe to EOF keeping at most cap bytes (head or tail), so a flood of output
    neither fills memory nor blocks the child on a full pipe."""

    def __init__(self, cap: int, keep_tail: bool):
        self.cap, self.keep_tail, self.data, self.truncated = cap, keep_tail, bytearray(), False

    async def drain(self, stream: asyncio.StreamReader) -> None:
        while chunk := await stream.read(65536):
            self.data += chunk
            if len(self.data) > self.cap:
                self.truncated = True
                self.data = self.data[len(self.data) - self.cap:] if self.keep_tail else self.data[: self.cap]

    def text(self) -> str:
        return self.data.decode("utf-8", errors="replace")


def _kill(proc: asyncio.subprocess.Process) -> None:
    if proc.returncode is None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # start_new_session made pid the group id
        except ProcessLookupError:
            pass


async def run_python(code: str, limits: SandboxLimits = SandboxLimits()) -> SandboxResult:
    """Run `code` as main.py in a fresh sandbox folder; never raises for anything the code
    does (errors, timeouts, limits end up in the result)."""
    layers = await asyncio.to_thread(available_layers, limits)  # probes once, off the event loop
    prefix = network_namespace_prefix() if "netns" in layers else None
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="rlpipe-sandbox-") as folder:
        folder = os.path.realpath(folder)
        with open(os.path.join(folder, "main.py"), "w", encoding="utf-8") as f:
            f.write(code)
        argv = [*(prefix or ()), sys.executable, "-I", "-S", "-B", "-c", BOOTSTRAP,
                "1" if "audit_hook" in layers else "0"]
        env = {"PATH": "/usr/bin:/bin", "HOME": folder, "TMPDIR": folder, "LANG": "C.UTF-8",
               "PYTHONIOENCODING": "utf-8", "OMP_NUM_THREADS": "1"}
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv, cwd=folder, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                stderr=subprocess.PIPE, start_new_session=True,
                preexec_fn=_child_setup(limits, folder, "landlock" in layers))
        except subprocess.SubprocessError as err:  # preexec_fn failed: rlimits or Landlock
            raise SandboxSetupError(f"could not apply the sandbox limits ({layers}): {err}") from err
        cap = limits.max_output_chars * 4  # bytes; trimmed to characters after decoding
        out_capture, err_capture = _Capture(cap, keep_tail=False), _Capture(cap, keep_tail=True)
        drains = [asyncio.create_task(out_capture.drain(proc.stdout)),
                  asyncio.create_task(err_capture.drain(proc.stderr))]
        timed_out = False
        try:
            try:
                await asyncio.wait_for(proc.wait(), limits.timeout_s)
            except asyncio.TimeoutError:
                timed_out = True
                _kill(proc)
                await proc.wait()
            # A descendant that left the process group could hold the pipes open: don't wait on it.
            await asyncio.wait(drains, timeout=2.0)
        finally:  # also on cancellation: never leave a child running
            _kill(proc)
            for task in drains:
                task.cancel()
    stdout, stderr, n = out_capture.text(), err_capture.text(), limits.max_output_chars
    truncated = out_capture.truncated or err_capture.truncated or len(stdout) > n or len(stderr) > n
    return SandboxResult(
        stdout=stdout[:n], stderr=stderr[-n:], returncode=proc.returncode,
        timed_out=timed_out, truncated=truncated, duration_s=time.monotonic() - started,
        layers=layers, limits=limits,
    )
