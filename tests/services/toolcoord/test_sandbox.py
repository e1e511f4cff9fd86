"""The python tool's sandbox, tried as an attacker would from inside it: host files, the project, the server
process, its secrets and the network are out of reach, and a host without a sandbox gets no python tool.

These need bwrap (`make setup` installs it); without it they fail with the reason, as the python tool would."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

import specrelay
from specrelay.services.toolcoord.tools import sandbox
from specrelay.services.toolcoord.tools.base import ToolError
from specrelay.services.toolcoord.tools.python_tool import PythonLimits, run_python
from specrelay.services.toolcoord.tools.registry import builtin_registry

FAST = PythonLimits(timeout_s=30.0, cpu_s=2, memory_bytes=256 * 2**20, file_bytes=64 * 1024, tmp_bytes=256 * 1024)


async def test_host_files_the_project_and_the_venv_are_not_there():
    project = str(Path(specrelay.__file__).resolve().parent)
    code = f"""
import json, os
for path in ('/etc/shadow', '/etc/passwd', '/root/.bash_history'):
    try:
        open(path).read()
        print('READ', path)
    except OSError as e:
        print(type(e).__name__, path)
print(json.dumps(sorted(os.listdir('/etc')) if os.path.exists('/etc') else []))
print(json.dumps(sorted(os.listdir('/'))))
for path in ({project!r}, {sys.prefix!r}):
    print(json.dumps(os.listdir(path) if os.path.exists(path) else None))
"""
    result = await run_python(code, FAST)
    assert not result.is_error, result.content
    *reads, etc, root, project_seen, venv_seen = result.content.splitlines()
    assert reads == ["FileNotFoundError /etc/shadow", "FileNotFoundError /etc/passwd",
                     "FileNotFoundError /root/.bash_history"]
    assert json.loads(etc) in ([], ["ld.so.cache"])  # the loader's cache, nothing else of /etc
    # The root holds the tops of the bound paths (the interpreter's prefix, the libraries) and the sandbox's own
    # mounts, nothing else; the project and the venv are absent (or empty, covered, under a bound path).
    found = sandbox.find_sandbox()
    bound = [*found.read_only, *(path for _, path in found.links)]
    assert set(json.loads(root)) == {p.split("/")[1] for p in bound} | {"proc", "dev", "tmp"}
    assert json.loads(project_seen) in (None, []) and json.loads(venv_seen) in (None, [])


async def test_writes_outside_tmp_fail_and_leave_nothing_on_the_host(tmp_path):
    project = Path(specrelay.__file__).resolve().parent
    tag = uuid.uuid4().hex
    # Files the code tries to delete: in the venv, the project (untracked, removed below) and the host's /tmp.
    canaries = [Path(sys.prefix) / f"specrelay-sandbox-canary-{tag}", project / f".sandbox-canary-{tag}"]
    for canary in canaries:
        canary.write_text("keep me")
    host_tmp_canary = tmp_path / "canary"
    host_tmp_canary.write_text("keep me")
    targets = [project / f"sandbox-probe-{tag}", Path(sys.prefix) / f"sandbox-probe-{tag}",
               tmp_path / f"sandbox-probe-{tag}", Path(sys.base_prefix) / f"sandbox-probe-{tag}",
               Path("/usr/lib") / f"sandbox-probe-{tag}", Path(f"/sandbox-probe-{tag}")]
    code = f"""
import os
for path in {[str(t) for t in targets]!r}:
    try:
        open(path, 'w').write('pwned')
        print('WROTE', path)
    except OSError as e:
        print(type(e).__name__, path)
for path in {[str(c) for c in [*canaries, host_tmp_canary]]!r}:
    try:
        os.remove(path)
        print('REMOVED', path)
    except OSError as e:
        print(type(e).__name__, path)
open('/tmp/inside-{tag}', 'w').write('only in the sandbox')
print(open('/tmp/inside-{tag}').read())
"""
    try:
        result = await run_python(code, FAST)
    finally:
        leftovers = [t for t in targets if t.exists()]
        for t in leftovers:
            t.unlink()
        canaries_survived = [c.exists() for c in canaries]
        for canary in canaries:
            canary.unlink(missing_ok=True)
    assert not result.is_error, result.content
    assert "WROTE" not in result.content and "REMOVED" not in result.content, result.content
    assert result.content.endswith("only in the sandbox")
    assert leftovers == [] and canaries_survived == [True, True] and host_tmp_canary.read_text() == "keep me"
    assert not Path(f"/tmp/inside-{tag}").exists()


async def test_only_the_sandboxes_own_processes_are_visible():
    code = "import os\nprint(sorted(p for p in os.listdir('/proc') if p.isdigit()), os.getpid(), os.getppid())"
    result = await run_python(code, FAST)
    assert result.content == "['1', '2'] 2 1"


# A stand-in for the server: it runs tool calls one after another, with a secret on its command line and in its
# environment, as `specrelay serve --api-key ...` would. A separate process, so that code which kills its parent
# kills the stand-in and not the test run.
SERVER = r"""
import asyncio, json, sys
from specrelay.services.toolcoord.tools.python_tool import PythonLimits, run_python

async def main():
    for code in json.loads(sys.stdin.read()):
        result = await run_python(code, PythonLimits(timeout_s=30.0, cpu_s=2))
        print(json.dumps([result.content, result.is_error]), flush=True)

asyncio.run(main())
"""


def _serve(codes: list[str], secret: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "SPECRELAY_API_KEY": secret + "-env"}
    # The timeout only catches a hang; the assertions are about what came back.
    return subprocess.run([sys.executable, "-c", SERVER, "--api-key", secret + "-argv"], input=json.dumps(codes),
                          capture_output=True, text=True, env=env, timeout=300)


def test_killing_the_parent_or_pid_1_does_not_reach_the_server():
    codes = ["import os\nos.kill(os.getppid(), 9)\nprint('still here')",
             "import os\nos.kill(1, 9)\nprint('still here')",
             "print(6 * 7)"]
    server = _serve(codes, secret="unused")
    assert server.returncode == 0, server.stderr
    results = [json.loads(line) for line in server.stdout.splitlines()]
    # Both hit the sandbox's own init (its PID 1, the code's parent), which the kernel shields from its namespace.
    assert results == [["still here", False], ["still here", False], ["42", False]]


def test_the_servers_command_line_and_environment_do_not_leak():
    secret = f"sk-{uuid.uuid4().hex}"
    code = f"""
import os
print(os.environ)
for pid in [str(os.getppid()), '{os.getpid()}'] + [p for p in os.listdir('/proc') if p.isdigit()]:
    for what in ('cmdline', 'environ'):
        try:
            print(pid, what, open(f'/proc/{{pid}}/{{what}}', 'rb').read())
        except OSError as e:
            print(pid, what, type(e).__name__)
"""
    server = _serve([code], secret)
    assert server.returncode == 0, server.stderr
    [(content, is_error)] = [json.loads(line) for line in server.stdout.splitlines()]
    assert not is_error, content
    assert "cmdline" in content and "environ" in content  # it did read /proc
    assert secret not in content and "--api-key" not in content and "SPECRELAY" not in content


async def test_no_network_namespace_peers():
    code = """
import socket
print([name for _, name in socket.if_nameindex()])
"""
    # socket.if_nameindex needs no socket, so the audit hook lets it through: what it sees is the namespace.
    result = await run_python(code, FAST)
    assert result.content == "['lo']"


async def test_tmp_is_writable_up_to_its_cap():
    code = """
open('a', 'w').write('x' * 1000)
print(open('/tmp/a').read().count('x'))
n = 0
try:
    while True:
        open(f'f{n}', 'wb').write(b'y' * 60000)  # each under the file size limit, together past the /tmp cap
        n += 1
except OSError as e:
    print(e.strerror)
"""
    result = await run_python(code, FAST)
    assert result.content == "1000\nNo space left on device"


async def test_without_bwrap_the_python_tool_is_refused_not_run_unsandboxed(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("PATH", str(tmp_path))  # no bwrap on it
    registry = builtin_registry()
    assert "python" not in registry and "calculator" in registry
    assert "bwrap (bubblewrap) is not installed" in caplog.text
    with pytest.raises(ToolError, match="the python tool is unavailable: bwrap"):
        await run_python("print(1)", FAST)


async def test_a_bwrap_that_cannot_create_namespaces_disables_the_tool(tmp_path, monkeypatch):
    fake = tmp_path / "bwrap"
    fake.write_text("#!/bin/sh\necho 'bwrap: No permissions to create new namespace' >&2\nexit 1\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:/usr/bin:/bin")
    registry = builtin_registry()
    assert "python" not in registry
    result = await registry.call("python", {"code": "print(1)"})
    assert result.is_error
    assert result.content.startswith("error: the python tool is unavailable on this server: bwrap cannot create "
                                     "the sandbox here (bwrap: No permissions to create new namespace)")


async def test_the_unsafe_opt_out_runs_on_the_host_and_says_so(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("PATH", f"{tmp_path}:/usr/bin:/bin")  # no bwrap on it; unshare may still be
    (tmp_path / "bwrap").write_text("#!/bin/sh\nexit 1\n")
    (tmp_path / "bwrap").chmod(0o755)
    registry = builtin_registry({"python": {"unsafe_no_sandbox": True, "timeout_s": 30}})
    assert "python" in registry and "unsafe_no_sandbox" in caplog.text
    result = await registry.call("python", {"code": "print(6 * 7)"})
    assert result.content == "42"
