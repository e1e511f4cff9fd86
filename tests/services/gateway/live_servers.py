"""Real servers as subprocesses, for the OpenAI-SDK tests: `specrelay serve` (every service in one process, the
embedded pair), and the compose topology — each service of compose.yaml started from its own `command` and
`environment` as a local process, against the test's Redis instead of the `redis` container.

What differs from `docker compose up` is only where things run: the Redis URL (`redis://redis:6379/...` -> the
test's server), the gateway's address (a free loopback port instead of 0.0.0.0:8000) and the entrypoint (the
venv's `specrelay` instead of the image's).
"""

from __future__ import annotations

import os
import re
import shlex
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
COMPOSE_FILE = ROOT / "compose.yaml"
PAIR_TARGET = ROOT / "models" / "target"  # the small trained pair: the model of the live tests, not compose's default
SPECRELAY = Path(sys.executable).parent / "specrelay"
STARTUP_TIMEOUT_S = 180.0  # three model processes loading at once on a small shared CPU
COMPOSE_REDIS = re.compile(r"redis://redis:6379(/\d+)?")
INTERPOLATION = re.compile(r"\$\{(\w+)(?:(:?-)([^}]*))?\}")
# How each compose command shows it is ready: one with a --port answers /health there; a verifier or drafter has
# joined its consumer group (after its model or tools loaded). Any other service in compose.yaml fails the test until taught.
READY_GROUPS = {"verifier": ("verifier.generate", "verifier"), "drafter": ("drafter.requests", "drafter"),
                "toolcoord": ("toolcoord.calls", "toolcoord")}
BUS_PREFIX = "specrelay:"  # shared.bus.BusConfig's default: compose's services do not change it


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_env(**extra: str) -> dict[str, str]:
    """The test's environment without the developer's own SPECRELAY_* settings (an API key would lock the SDK
    tests out); one torch thread, which a tiny model on a shared CPU runs fastest with."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SPECRELAY_")}
    env["OMP_NUM_THREADS"] = "1"
    env.update(extra)
    return env


@dataclass
class Process:
    name: str
    argv: list[str]
    log_path: Path
    popen: subprocess.Popen

    def log_tail(self, max_chars: int = 4000) -> str:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return text[-max_chars:]


@dataclass
class LiveServer:
    """Processes that together serve the OpenAI API at `url`; `stop()` ends them all."""

    url: str = ""
    processes: list[Process] = field(default_factory=list)

    def start(self, name: str, argv: list[str], env: dict[str, str], log_dir: Path) -> Process:
        log_path = log_dir / f"{name}.log"
        with log_path.open("wb") as log:
            popen = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT,
                                     start_new_session=True)
        process = Process(name, argv, log_path, popen)
        self.processes.append(process)
        return process

    def logs(self) -> str:
        return "\n".join(f"----- {p.name}: {shlex.join(p.argv)} (exit {p.popen.poll()})\n{p.log_tail()}"
                         for p in self.processes)

    def check_alive(self) -> None:
        for p in self.processes:
            if p.popen.poll() is not None:
                raise RuntimeError(f"{p.name} exited with status {p.popen.returncode}\n{self.logs()}")

    def stop(self) -> None:
        for p in self.processes:
            if p.popen.poll() is None:
                p.popen.terminate()
        for p in self.processes:
            try:
                p.popen.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.popen.kill()
                p.popen.wait(timeout=10)


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


def _joined(redis_client, stream: str, group: str) -> bool:
    from redis.exceptions import ResponseError

    try:
        return bool(redis_client.xinfo_consumers(f"{BUS_PREFIX}stream:{stream}", group))
    except ResponseError:  # no stream or no group yet
        return False


def wait_ready(server: LiveServer, urls: list[str], groups: list[tuple[str, str]], redis_url: str | None) -> None:
    redis_client = None
    if groups:
        import redis

        redis_client = redis.Redis.from_url(redis_url)
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    try:
        while not (all(_healthy(url) for url in urls) and all(_joined(redis_client, s, g) for s, g in groups)):
            server.check_alive()
            if time.monotonic() > deadline:
                raise TimeoutError(f"not ready after {STARTUP_TIMEOUT_S:.0f}s\n{server.logs()}")
            time.sleep(0.2)
    finally:
        if redis_client is not None:
            redis_client.close()


def start_serve(log_dir: Path) -> LiveServer:
    """`specrelay serve` on a free loopback port: the small pair (its draft comes with it) over the in-process bus."""
    port = free_port()
    server = LiveServer(f"http://127.0.0.1:{port}")
    server.start("serve", [str(SPECRELAY), "serve", "--model", str(PAIR_TARGET), "--host", "127.0.0.1", "--port",
                           str(port)], child_env(), log_dir)
    try:
        wait_ready(server, [server.url], [], None)
    except BaseException:
        server.stop()
        raise
    return server


def interpolate(value: str, env: dict[str, str]) -> str:
    """Compose's `${NAME}`, `${NAME:-default}` and `${NAME-default}`, as `docker compose` expands them."""
    def expand(m: re.Match) -> str:
        name, op, default = m.groups()
        value = env.get(name)
        if value is None or (value == "" and op == ":-"):
            return default or ""
        return value

    return INTERPOLATION.sub(expand, value)


def compose_services(path: Path = COMPOSE_FILE) -> dict[str, dict]:
    import yaml

    return yaml.safe_load(path.read_text())["services"]


@dataclass
class ComposeCommand:
    service: str
    argv: list[str]  # [specrelay, command, ...]
    env: dict[str, str]
    port: int | None  # its --port, rewritten to a free loopback port

    @property
    def command(self) -> str:
        return self.argv[1]


def compose_commands(redis_url: str, path: Path = COMPOSE_FILE) -> list[ComposeCommand]:
    """Every specrelay service of compose.yaml, rewritten for loopback: the test's Redis, free ports."""
    # compose's defaults suit a container serving SmolLM2, not a shared test CPU: one thread, the small pair
    interp_env = child_env(SPECRELAY_THREADS="1", SPECRELAY_MODEL=str(PAIR_TARGET), SPECRELAY_PROPOSER="tree")
    commands = []
    for name, service in compose_services(path).items():
        if "build" not in service:  # redis: the test brings its own
            continue
        command = service["command"]
        args = shlex.split(command) if isinstance(command, str) else [str(a) for a in command]
        args = [COMPOSE_REDIS.sub(redis_url, interpolate(a, interp_env)) for a in args]
        port = None
        if "--host" in args:
            args[args.index("--host") + 1] = "127.0.0.1"
        if "--port" in args:
            port = free_port()
            args[args.index("--port") + 1] = str(port)
        environment = service.get("environment") or {}
        if isinstance(environment, list):
            environment = dict(item.split("=", 1) for item in environment)
        env = {k: COMPOSE_REDIS.sub(redis_url, interpolate(str(v), interp_env)) for k, v in environment.items()}
        commands.append(ComposeCommand(name, [str(SPECRELAY), *args], child_env(**env), port))
    return commands


def start_compose(redis_url: str, log_dir: Path) -> LiveServer:
    """Every specrelay service of compose.yaml as its own process; ready when each HTTP service answers /health
    and each verifier and drafter has joined its consumer group."""
    commands = compose_commands(redis_url)
    [gateway] = [c for c in commands if c.command == "gateway"]
    server = LiveServer(f"http://127.0.0.1:{gateway.port}")
    urls, groups = [], []
    try:
        for c in commands:
            if c.command in READY_GROUPS:
                groups.append(READY_GROUPS[c.command])
            elif c.port is not None:
                urls.append(f"http://127.0.0.1:{c.port}")
            else:
                raise RuntimeError(f"compose service {c.service!r} runs `specrelay {c.command}`: teach "
                                   "live_servers.py how to tell when it is ready")
            server.start(c.service, c.argv, c.env, log_dir)
        wait_ready(server, urls, groups, redis_url)
    except BaseException:
        server.stop()
        raise
    return server
