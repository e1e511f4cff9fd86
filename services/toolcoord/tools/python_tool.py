"""`python`: run model-written code in a separate, limited interpreter inside a sandbox.

Layers, outermost first:
  1. The sandbox (`sandbox.py`): bubblewrap namespaces of its own (user, mount, PID, network, IPC), a read-only
     filesystem holding only the interpreter and its libraries, a size-capped tmpfs /tmp as the only writable
     place, a /proc that shows only the sandbox's processes, a clean environment. Without a working bwrap the tool
     is not offered at all (`registry.py` says why) unless the operator opts out with `unsafe_no_sandbox = true`:
     then the child runs on the host in an empty temporary directory, in a fresh network namespace when
     `unshare --net --map-root-user` works, and the layers below are all there is.
  2. Wall clock: the child runs in its own session; past `timeout_s` the whole process group is killed (bwrap's
     --die-with-parent takes everything inside the sandbox with it).
  3. Kernel limits, set by the child's bootstrap before the user code is read (`resource.setrlimit`, soft = hard;
     not in a preexec_fn, which is unsafe in a threaded parent): CPU seconds (SIGXCPU), address space
     (allocations fail with MemoryError), file size (writes past it fail), RLIMIT_NPROC = 0 (fork fails; the
     kernel does not enforce it for host root, which is why layer 4 also blocks process creation), no core files.
  4. An audit hook (PEP 578), installed in the child before the user code is compiled, refuses socket creation
     and connection, process creation (fork, exec, spawn, system, subprocess), ctypes, raising rlimits and walking
     the gc graph. Audit hooks are not a sandbox on their own (code could still reach C through modules
     already imported); they are a second wall behind the kernel's.
ctypes is refused outright, so libraries that load it at import (numpy among them) are not available to the code.
The interpreter runs with `-I` (isolated: no user site, no PYTHON* variables, no script directory on sys.path)
in an empty working directory, with a minimal environment.
"""

from __future__ import annotations

import asyncio
import functools
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Any

from specrelay.services.toolcoord.tools.base import ToolError, ToolResult
from specrelay.services.toolcoord.tools.sandbox import SandboxUnavailable, find_sandbox

SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {"code": {"type": "string", "description": "Python 3 source; print() what you want to see"}},
    "required": ["code"],
}
DESCRIPTION = "Run Python 3 code in a sandbox (no network, limited time and memory) and return what it printed."

# Runs inside the child before the user's code; the code arrives on stdin so it never appears in argv.
_BOOTSTRAP = r"""
import resource, sys
def _limit(cpu_s, memory_bytes, file_bytes):
    # Soft and hard alike, so the code cannot raise them again (and the audit hook refuses setrlimit anyway).
    for which, value in ((resource.RLIMIT_CPU, cpu_s), (resource.RLIMIT_AS, memory_bytes),
                         (resource.RLIMIT_FSIZE, file_bytes), (resource.RLIMIT_NPROC, 0), (resource.RLIMIT_CORE, 0)):
        resource.setrlimit(which, (value, value))
_limit(*(int(a) for a in sys.argv[1:4]))
del _limit
def _install():
    # The lists live in the closure, not in globals the user code could rebind.
    blocked = frozenset(("socket.__new__", "socket.connect", "socket.bind", "socket.getaddrinfo", "os.fork",
        "os.forkpty", "os.exec", "os.posix_spawn", "os.spawn", "os.system", "subprocess.Popen", "pty.spawn",
        "ctypes.dlopen", "ctypes.dlsym", "ctypes.cdata", "ctypes.call_function", "gc.get_objects",
        "gc.get_referrers", "gc.get_referents", "resource.setrlimit", "resource.prlimit"))
    blocked_modules = frozenset(("ctypes", "_ctypes", "_posixsubprocess", "multiprocessing", "_multiprocessing"))
    def hook(event, args):
        if event in blocked:
            raise PermissionError(f"sandbox: {event} is not allowed")
        if event == "import" and args and str(args[0]).split(".")[0] in blocked_modules:
            raise PermissionError(f"sandbox: importing {args[0]} is not allowed")
    sys.addaudithook(hook)
_install()
del _install
_code = compile(sys.stdin.read(), "<tool>", "exec")
exec(_code, {"__name__": "__main__", "__builtins__": __builtins__})
"""


@dataclass(frozen=True)
class PythonLimits:
    timeout_s: float = 10.0  # wall clock, the whole run
    cpu_s: int = 5
    memory_bytes: int = 512 * 2**20  # address space; the interpreter itself needs ~30 MiB of it
    file_bytes: int = 1 * 2**20
    max_output_chars: int = 16_000  # of stdout and of stderr each; the rest is cut with a note
    tmp_bytes: int = 16 * 2**20  # the sandbox's /tmp, all files together (a tmpfs lives in host memory)


def _child_env(workdir: str) -> dict[str, str]:
    # One thread per numeric library: thread creation counts against RLIMIT_NPROC = 0.
    return {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": workdir, "OMP_NUM_THREADS": "1",
            "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


@functools.cache
def network_isolation() -> str:
    """Without the sandbox (`unsafe_no_sandbox`): "namespace" when children can start in an empty network
    namespace, else "audit-hook"."""
    exe = shutil.which("unshare")
    if exe is None:
        return "audit-hook"
    try:
        probe = subprocess.run([exe, "--net", "--map-root-user", "true"], capture_output=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return "audit-hook"
    return "namespace" if probe.returncode == 0 else "audit-hook"


def _clip(data: bytes, total_bytes: int, limit_chars: int) -> str:
    text = data.decode(errors="replace")
    if len(text) <= limit_chars and total_bytes == len(data):
        return text
    return text[:limit_chars] + f"\n[... output cut: {total_bytes} bytes in all]"


async def _read_capped(stream: asyncio.StreamReader, limit_bytes: int) -> tuple[bytes, int]:
    """Read all of a pipe but keep only the first limit_bytes (the child must never block on a full pipe)."""
    kept, total = bytearray(), 0
    while chunk := await stream.read(65536):
        total += len(chunk)
        if len(kept) < limit_bytes:
            kept += chunk[: limit_bytes - len(kept)]
    return bytes(kept), total


async def run_python(code: str, limits: PythonLimits = PythonLimits(), *,
                     unsafe_no_sandbox: bool = False) -> ToolResult:
    """Run `code`; the result holds stdout, stderr and why it stopped. A limit hit is an error result. Without a
    working sandbox this refuses (ToolError) unless `unsafe_no_sandbox` says to run on the host."""
    if not isinstance(code, str):
        raise ToolError("code must be a string")
    python_args = ["-I", "-X", "utf8", "-c", _BOOTSTRAP, str(limits.cpu_s), str(limits.memory_bytes),
                   str(limits.file_bytes)]
    started = time.monotonic()
    if unsafe_no_sandbox:
        with tempfile.TemporaryDirectory(prefix="specrelay-python-") as workdir:
            argv = [sys.executable, *python_args]
            if network_isolation() == "namespace":
                argv = [shutil.which("unshare") or "unshare", "--net", "--map-root-user", *argv]
            returncode, out, err, timed_out = await _run(argv, code, limits, workdir, _child_env(workdir))
    else:
        try:
            sandbox = await asyncio.to_thread(find_sandbox)  # the first call runs bwrap once to check it
        except SandboxUnavailable as e:
            raise ToolError(f"the python tool is unavailable: {e}") from None
        argv = [*sandbox.command(limits.tmp_bytes, _child_env("/tmp")), *python_args]
        # bwrap's own environment is what the sandbox's PID 1 shows in /proc/1/environ: keep it bare too.
        returncode, out, err, timed_out = await _run(argv, code, limits, None, {"PATH": "/usr/bin:/bin"})
        if returncode is not None and returncode - 128 in signal.valid_signals():
            # bwrap reports a child killed by signal N as exit status 128 + N (so does a shell; code calling
            # sys.exit(128 + N) itself reads the same, which is rare enough to accept).
            returncode = 128 - returncode
    elapsed = time.monotonic() - started
    stdout = _clip(*out, limits.max_output_chars)
    stderr = _clip(*err, limits.max_output_chars)
    status = _describe_exit(returncode, timed_out, limits)
    parts = [stdout.rstrip("\n")] if stdout else []
    if stderr:
        parts.append("[stderr]\n" + stderr.rstrip("\n"))
    if status:
        parts.append(f"[{status}]")
    return ToolResult(content="\n".join(parts), is_error=bool(status), elapsed_s=elapsed)


async def _run(argv: list[str], code: str, limits: PythonLimits, cwd: str | None,
               env: dict[str, str]) -> tuple[int | None, tuple[bytes, int], tuple[bytes, int], bool]:
    """Start argv with the code on stdin; (exit status, (stdout, total bytes), (stderr, total bytes), timed out)."""
    proc = await asyncio.create_subprocess_exec(
        *argv, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        cwd=cwd, env=env, start_new_session=True)
    cap = limits.max_output_chars * 4 + 16  # bytes: enough for max_output_chars of any UTF-8 text
    readers = asyncio.ensure_future(asyncio.gather(_read_capped(proc.stdout, cap), _read_capped(proc.stderr, cap)))
    try:
        proc.stdin.write(code.encode())
        await proc.stdin.drain()
        proc.stdin.close()
    except (BrokenPipeError, ConnectionResetError):
        pass  # the child died before reading its code (a limit at start-up): its exit status says why
    exited = asyncio.ensure_future(proc.wait())
    # Both: a child may close its pipes and keep running.
    _, running = await asyncio.wait({readers, exited}, timeout=limits.timeout_s, return_when=asyncio.ALL_COMPLETED)
    timed_out = bool(running)
    if timed_out:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    out, err = await readers  # the pipes close once the group is dead: keep what it printed
    await proc.wait()
    return proc.returncode, out, err, timed_out


def _describe_exit(returncode: int | None, timed_out: bool, limits: PythonLimits) -> str:
    if timed_out:
        return f"killed: wall-clock limit of {limits.timeout_s:g} s"
    if returncode == 0:
        return ""
    if returncode in (-signal.SIGXCPU, -signal.SIGKILL):
        return f"killed: CPU limit of {limits.cpu_s} s"
    if returncode == -signal.SIGXFSZ:
        return f"killed: file size limit of {limits.file_bytes} bytes"
    if returncode is not None and returncode < 0:
        return f"killed by signal {signal.Signals(-returncode).name}"
    return f"exit status {returncode}"
