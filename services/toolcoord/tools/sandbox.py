"""The python tool's sandbox: bubblewrap (`bwrap`) namespaces around a bare interpreter.

What the code inside sees:
  - its own user (uid/gid 65534, no capabilities, no further user namespaces), mount, PID, network, IPC, UTS and
    cgroup namespaces; with no network namespace peers, every connect fails;
  - a read-only filesystem holding only the interpreter's prefix (its binary and stdlib) and the shared libraries it
    links (/usr/lib, /lib64 and the loader cache); no /etc, no home, no project, no virtual environment. The project
    and the venv are covered with empty tmpfs should they sit under one of those paths;
  - a fresh /proc for its own PID namespace, read-only: its own processes only (bwrap's init as PID 1), so neither
    the server's command line nor its environment can be read, and no host process can be signalled;
  - a fresh minimal /dev (read-only; /dev/null and friends still work) and a size-capped tmpfs at /tmp, the only
    writable place, which is also its working directory and home;
  - an environment of our own making (--clearenv): nothing the server had (an API key, Redis URLs) is inherited.
--die-with-parent ties the sandbox to bwrap, so killing bwrap's process group (the wall clock) ends everything
inside; --new-session keeps it off the server's terminal.

Run as root (as in our containers) the sandbox's user maps to host root: the kernel then does not enforce
RLIMIT_NPROC, which is why the python tool's audit hook still refuses process creation, and why /proc and /dev
are read-only (root-owned sysctls would otherwise be writable). Run the server as an ordinary user where you can.

`find_sandbox()` runs bwrap once with the real command and checks what the child sees, so a host where bwrap is
missing or namespaces are forbidden (Docker's default seccomp profile forbids them) is found at start-up, and the
python tool is turned off with the reason rather than run without a sandbox.
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

SANDBOX_UID = 65534  # "nobody"
# Shared libraries the interpreter and its extension modules link; symlinks (merged /usr) are recreated as links.
_LIBRARY_PATHS = ("/usr/lib", "/usr/lib64", "/lib", "/lib64", "/etc/ld.so.cache")
_PROJECT_ROOT = Path(__file__).resolve().parents[3]


class SandboxUnavailable(Exception):
    """bwrap is missing or cannot create the namespaces here; the message says which and what to do."""


@dataclass(frozen=True)
class Sandbox:
    bwrap: str  # the bwrap executable
    interpreter: str  # the base interpreter, never a venv's wrapper
    read_only: tuple[str, ...]  # host paths bound read-only at the same place
    links: tuple[tuple[str, str], ...]  # (target, path): symlinks recreated inside, e.g. /lib -> usr/lib
    hidden: tuple[str, ...]  # paths under a bound one that get an empty tmpfs instead (project, venv)

    def command(self, tmp_bytes: int, env: dict[str, str]) -> list[str]:
        """bwrap's arguments up to and including the interpreter; the interpreter's own arguments follow."""
        argv = [self.bwrap, "--unshare-all", "--unshare-user", "--disable-userns",
                "--uid", str(SANDBOX_UID), "--gid", str(SANDBOX_UID), "--cap-drop", "ALL",
                "--die-with-parent", "--new-session", "--hostname", "sandbox", "--clearenv"]
        for key, value in env.items():
            argv += ["--setenv", key, value]
        for path in self.read_only:
            argv += ["--ro-bind", path, path]
        for target, path in self.links:
            argv += ["--symlink", target, path]
        for path in self.hidden:
            argv += ["--tmpfs", path, "--remount-ro", path]
        argv += ["--proc", "/proc", "--remount-ro", "/proc", "--dev", "/dev", "--remount-ro", "/dev",
                 "--size", str(tmp_bytes), "--tmpfs", "/tmp", "--remount-ro", "/", "--chdir", "/tmp",
                 self.interpreter]
        return argv


def _is_under(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


def _layout(bwrap: str) -> Sandbox:
    interpreter = os.path.realpath(getattr(sys, "_base_executable", None) or sys.executable)
    prefixes = {os.path.realpath(p) for p in (sys.base_prefix, sys.base_exec_prefix)}
    prefixes.add(os.path.dirname(os.path.dirname(interpreter)))  # the binary's own prefix, if it differs
    if any(p in ("/", "/etc", "/root", "/home") for p in prefixes):
        raise SandboxUnavailable(f"the interpreter's prefix {sorted(prefixes)} would expose the host's files")
    read_only, links = set(prefixes), []
    for path in _LIBRARY_PATHS:
        if os.path.islink(path):
            links.append((os.readlink(path), path))
        elif os.path.exists(path):
            read_only.add(path)
    # A path inside another bound path needs no bind of its own.
    roots = tuple(sorted(p for p in read_only if not any(q != p and _is_under(p, q) for q in read_only)))
    hide = {str(_PROJECT_ROOT), os.path.realpath(sys.prefix)} - prefixes
    hidden = tuple(sorted(p for p in hide if any(_is_under(p, r) and p != r for r in roots)))
    return Sandbox(bwrap, interpreter, roots, tuple(links), hidden)


# What the probe's child checks about itself: the uid it runs as, that it sees only its own processes, that /tmp
# is writable and / is not, and that its network namespace holds nothing but a loopback.
_PROBE = r"""
import os
assert os.getuid() == 65534, os.getuid()
assert {p for p in os.listdir('/proc') if p.isdigit()} <= {'1', '2', '3'}, os.listdir('/proc')
open('/tmp/probe', 'w').write('x')
try:
    open('/probe', 'w')
    raise AssertionError('/ is writable')
except OSError:
    pass
import socket
assert [name for _, name in socket.if_nameindex()] == ['lo'], socket.if_nameindex()
print('sandbox ok')
"""


@functools.cache
def _probe(bwrap: str | None) -> Sandbox | str:
    if bwrap is None:
        return "bwrap (bubblewrap) is not installed: `make setup`, or apt-get install bubblewrap"
    try:
        sandbox = _layout(bwrap)
    except SandboxUnavailable as e:
        return str(e)
    argv = [*sandbox.command(1 << 20, {"LANG": "C.UTF-8"}), "-I", "-c", _PROBE]
    try:
        done = subprocess.run(argv, capture_output=True, timeout=60, env={"PATH": "/usr/bin:/bin"})
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"bwrap could not be run: {e}"
    if done.returncode != 0 or done.stdout.strip() != b"sandbox ok":
        why = (done.stderr.decode(errors="replace").strip() or f"exit status {done.returncode}").splitlines()[-1]
        return f"bwrap cannot create the sandbox here ({why}); namespaces may be forbidden (in Docker: a seccomp " \
               f"profile that allows them)"
    return sandbox


def find_sandbox() -> Sandbox:
    """The sandbox to run tool code in, checked once per bwrap path; SandboxUnavailable says why there is none."""
    found = _probe(shutil.which("bwrap"))
    if isinstance(found, str):
        raise SandboxUnavailable(found)
    return found
