"""A server started from a command template for a measurement, and stopped after it (`--server-cmd`).

`{schedule}` in the command becomes the policy's name and `{port}` a free port (or the one given); the loadgen waits
for /v1/models, yields the endpoint, and stops the command's process group (SIGTERM, then SIGKILL after 20 s). The
server's output goes to `OUT_DIR/server-<label>.log`.
"""

from __future__ import annotations

import asyncio
import os
import shlex
import signal
import socket
import subprocess
import time
from contextlib import asynccontextmanager
from pathlib import Path
from typing import AsyncIterator

import aiohttp

from specrelay.loadgen.client import EndpointError, discover_model
from specrelay.shared.errors import ConfigError


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@asynccontextmanager
async def serving(label: str, endpoint: str | None, server_cmd: str | None, *, out_dir: str, port: int | None,
                  ready_timeout_s: float) -> AsyncIterator[str]:
    """Yield the endpoint; for a server command, start it first and stop it after."""
    if server_cmd is None:
        yield endpoint or ""
        return
    port = port or free_port()
    argv = shlex.split(server_cmd.format(schedule=label, port=port))
    log_path = Path(out_dir) / f"server-{label}.log"
    url = f"http://127.0.0.1:{port}"
    with open(log_path, "wb") as log:
        try:
            proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        except OSError as e:
            raise ConfigError(f"--server-cmd {argv[0]!r} cannot start: {e.strerror or e}") from None
        try:
            await _wait_ready(proc, url, ready_timeout_s, log_path)
            yield url
        finally:
            _stop(proc)


async def _wait_ready(proc: subprocess.Popen, endpoint: str, timeout_s: float, log_path: Path) -> None:
    deadline = time.monotonic() + timeout_s
    async with aiohttp.ClientSession() as session:
        while True:
            if proc.poll() is not None:
                tail = log_path.read_text(errors="replace")[-500:]
                raise EndpointError(f"server command exited with status {proc.returncode} before serving:\n{tail}")
            try:
                await discover_model(session, endpoint, timeout_s=2.0)
                return
            except EndpointError:
                if time.monotonic() > deadline:
                    raise EndpointError(f"server at {endpoint} not ready after {timeout_s:g}s (log: {log_path})")
                await asyncio.sleep(0.2)


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)  # the group we created: the server and anything it spawned
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
