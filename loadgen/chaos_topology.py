"""The Redis topology of compose.yaml as local processes, for `specrelay chaos`: its own redis-server on a free
port, then each specrelay service with the command compose.yaml gives it, a supervisor that restarts what exits
(compose's `restart: unless-stopped`), and the faults' levers (kill -9 a service, restart Redis on its port).

The commands are compose.yaml's, rewritten for loopback as tests/services/gateway/live_servers.py does (the Redis
URL, 127.0.0.1 and free ports), with the model, draft and proposer chaos was asked for (compose's
`${SPECRELAY_MODEL}` and `${SPECRELAY_PROPOSER}`; the drafter's `--draft` added when there is one);
tests/loadgen/test_chaos.py checks they stay compose.yaml's. They are written out here, not read from compose.yaml,
so that the command needs neither the repository checkout nor a YAML parser.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from specrelay.shared.errors import SpecrelayError
from specrelay.shared.redis_keys import DEFAULT_PREFIX, work_stream

ROOT = Path(__file__).resolve().parents[1]
BUS_PREFIX = DEFAULT_PREFIX  # shared.bus.BusConfig's default: compose's services do not change it
KV_CAPACITY = "2G"  # compose's ${SPECRELAY_KV_CAPACITY:-2G}
# docker's restart policy: wait 100 ms before the first restart, double the wait on each further one, and start
# again from 100 ms once a container has run 10 s.
RESTART_DELAY_S = 0.1
RESTART_DELAY_MAX_S = 5.0
RESTART_RESET_S = 10.0


class TopologyError(SpecrelayError):
    """The stack could not be started (a missing redis-server, a service that died or never became ready)."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass(frozen=True)
class ServiceSpec:
    name: str  # unique in the stack: "verifier-1", "verifier-2", "drafter", ...
    service: str  # its compose.yaml service
    args: tuple[str, ...]  # after `specrelay`
    env: dict[str, str]  # compose's `environment`, rewritten for the local Redis
    port: int | None = None  # an HTTP service's /health port
    group: tuple[str, str] | None = None  # a worker's (stream, group): ready once it has joined

    @property
    def ready_probe(self) -> str:
        return f"http://127.0.0.1:{self.port}/health" if self.port else f"group {self.group[1]} on {self.group[0]}"


def services(redis_url: str, model: str, draft: str | None, *, proposer: str = "tree", num_verifiers: int = 2,
             verifier_args: tuple[str, ...] = (), toolcoord: bool = True) -> list[ServiceSpec]:
    """compose.yaml's specrelay services against `redis_url`, `num_verifiers` verifier replicas
    (`docker compose up --scale verifier=N`); the drafter proposes with `proposer` (and `draft`, if one)."""
    def port() -> int:
        return free_port()

    specs = [ServiceSpec("gateway", "gateway",
                         ("gateway", "--model", model, "--redis", redis_url, "--host", "127.0.0.1", "--port",
                          str(gateway_port := port()), "--remote-tools"),
                         {"SPECRELAY_API_KEY": "", "SPECRELAY_TOOLS": ""}, port=gateway_port)]
    for i in range(1, num_verifiers + 1):
        specs.append(ServiceSpec(f"verifier-{i}", "verifier", ("verifier", "--model", model, *verifier_args),
                                 {"SPECRELAY_REDIS": redis_url, "SPECRELAY_KVSTORE": redis_url,
                                  "SPECRELAY_KV_CAPACITY": KV_CAPACITY, "OMP_NUM_THREADS": "1"},
                                 group=("verifier.generate", "verifier")))
    drafter = ("drafter", "--model", model, "--proposer", proposer) + (("--draft", draft) if draft else ())
    specs.append(ServiceSpec("drafter", "drafter", drafter,
                             {"SPECRELAY_REDIS": redis_url, "OMP_NUM_THREADS": "1"},
                             group=("drafter.requests", "drafter")))
    specs.append(ServiceSpec("kvstore", "kvstore", ("kvstore", "--host", "127.0.0.1", "--port", str(kv_port := port())),
                             {"SPECRELAY_REDIS": redis_url, "SPECRELAY_KV_CAPACITY": KV_CAPACITY}, port=kv_port))
    if toolcoord:
        specs.append(ServiceSpec("toolcoord", "toolcoord", ("toolcoord",),
                                 {"SPECRELAY_REDIS": redis_url, "SPECRELAY_TOOLS": ""},
                                 group=("toolcoord.calls", "toolcoord")))
    return specs


def child_env(extra: dict[str, str]) -> dict[str, str]:
    """Ours without SPECRELAY_* settings (an API key would lock the chaos client out); one torch thread each: on a
    small shared CPU a tiny model runs fastest so."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SPECRELAY_")}
    env["OMP_NUM_THREADS"] = "1"
    env["PYTHONUNBUFFERED"] = "1"  # a killed process's last lines are in its log, not lost in a buffer
    env.update(extra)
    return env


@dataclass
class Running:
    spec: ServiceSpec
    popen: subprocess.Popen
    started_s: float
    num_restarts: int = 0
    killed_by_us: bool = False  # the exit about to be seen is a fault we injected, not a crash
    restart_at: float | None = None


@dataclass
class Exit:
    """A service process that ended while the stack ran: how (signal or status) and whether we caused it."""

    name: str
    returncode: int
    injected: bool
    at_s: float

    @property
    def how(self) -> str:
        return f"signal {-self.returncode}" if self.returncode < 0 else f"status {self.returncode}"


@dataclass
class Stack:
    """Redis and the services as processes; `supervise()` restarts any that exits, as docker would."""

    specs: list[ServiceSpec]
    redis_port: int
    log_dir: Path
    specrelay: Path = field(default_factory=lambda: Path(sys.executable).parent / "specrelay")
    redis: subprocess.Popen | None = None
    running: dict[str, Running] = field(default_factory=dict)
    exits: list[Exit] = field(default_factory=list)

    @property
    def redis_url(self) -> str:
        return f"redis://127.0.0.1:{self.redis_port}/0"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.spec('gateway').port}"

    def spec(self, name: str) -> ServiceSpec:
        return next(s for s in self.specs if s.name == name)

    # --- processes ---------------------------------------------------------------------------------------------

    def start_redis(self) -> None:
        exe = shutil.which("redis-server")
        if exe is None:
            raise TopologyError("redis-server is not installed (`make setup` installs it)")
        log = (self.log_dir / "redis.log").open("ab")
        self.redis = subprocess.Popen([exe, "--port", str(self.redis_port), "--bind", "127.0.0.1", "--save", "",
                                       "--appendonly", "no"], stdout=log, stderr=subprocess.STDOUT,
                                      start_new_session=True)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.redis_port), timeout=0.2).close()
                return
            except OSError:
                if self.redis.poll() is not None:
                    break
                time.sleep(0.05)
        raise TopologyError(f"redis-server did not start on port {self.redis_port}\n{self.tail('redis')}")

    def kill_redis(self) -> None:
        if self.redis is not None and self.redis.poll() is None:
            self.redis.kill()
            self.redis.wait(timeout=10)

    def start(self, spec: ServiceSpec) -> Running:
        with (self.log_dir / f"{spec.name}.log").open("ab") as log:
            popen = subprocess.Popen([str(self.specrelay), *spec.args], stdout=log, stderr=subprocess.STDOUT,
                                     env=child_env(spec.env), cwd=self.log_dir, start_new_session=True)
        previous = self.running.get(spec.name)
        run = Running(spec, popen, time.monotonic(), previous.num_restarts + 1 if previous else 0)
        self.running[spec.name] = run
        return run

    def kill(self, name: str) -> None:
        """kill -9: no SIGTERM handler runs, nothing is given back; the supervisor restarts it."""
        run = self.running[name]
        run.killed_by_us = True
        os.kill(run.popen.pid, signal.SIGKILL)
        run.popen.wait(timeout=10)  # gone before anyone asks whether it is ready

    def supervise_once(self) -> None:
        """One look at every service: note exits, restart those whose back-off has passed."""
        now = time.monotonic()
        for name, run in list(self.running.items()):
            code = run.popen.poll()
            if code is None:
                continue
            if run.restart_at is None:
                self.exits.append(Exit(name, code, run.killed_by_us, now))
                ran_s = now - run.started_s
                tries = 0 if ran_s >= RESTART_RESET_S else run.num_restarts
                run.restart_at = now + min(RESTART_DELAY_S * 2 ** tries, RESTART_DELAY_MAX_S)
            elif now >= run.restart_at:
                restarted = self.start(run.spec)
                if now - run.started_s >= RESTART_RESET_S:
                    restarted.num_restarts = 0

    async def supervise(self, interval_s: float = 0.05) -> None:
        while True:
            self.supervise_once()
            await asyncio.sleep(interval_s)

    def stop(self) -> None:
        for run in self.running.values():
            if run.popen.poll() is None:
                run.popen.terminate()
        for run in self.running.values():
            try:
                run.popen.wait(timeout=10)
            except subprocess.TimeoutExpired:
                run.popen.kill()
                run.popen.wait(timeout=10)
        if self.redis is not None and self.redis.poll() is None:
            self.redis.terminate()
            self.redis.wait(timeout=10)

    # --- readiness ---------------------------------------------------------------------------------------------

    def not_ready(self, redis_client) -> list[str]:
        return [s.name for s in self.specs if not self.ready(s.name, redis_client)]

    def ready(self, name: str, redis_client) -> bool:
        """Serving again: an HTTP service answers /health with 200; a worker is a consumer of its group (it joins
        once its model is loaded and it reads the stream)."""
        run = self.running.get(name)
        if run is None or run.popen.poll() is not None:
            return False
        spec = run.spec
        if spec.port is not None:
            try:
                with urllib.request.urlopen(spec.ready_probe, timeout=2) as r:
                    return r.status == 200
            except OSError:
                return False
        from redis.exceptions import RedisError

        stream, group = spec.group
        try:
            consumers = redis_client.xinfo_consumers(work_stream(BUS_PREFIX, stream), group)
        except RedisError:  # no stream or group yet, or Redis away
            return False
        # a killed replica stays listed (by its pid-named consumer) until pruned: ours must be there
        return any(c["name"].decode(errors="replace").endswith(f"-{run.popen.pid}") for c in consumers)

    def tail(self, name: str, max_chars: int = 3000) -> str:
        path = self.log_dir / f"{name}.log"
        return path.read_text(errors="replace")[-max_chars:] if path.exists() else ""

    def logs(self) -> str:
        return "\n".join(f"----- {name} (exit {run.popen.poll()})\n{self.tail(name)}"
                         for name, run in self.running.items())


def start_stack(specs: list[ServiceSpec], redis_port: int, log_dir: Path, timeout_s: float) -> Stack:
    """Redis, then every service; returns once each is ready. Raises TopologyError (with the logs) if one exits
    or is not ready in `timeout_s`."""
    import redis

    stack = Stack(specs, redis_port, log_dir)
    stack.start_redis()
    client = redis.Redis.from_url(stack.redis_url)
    try:
        for spec in specs:
            stack.start(spec)
        deadline = time.monotonic() + timeout_s
        while not all(stack.ready(s.name, client) for s in specs):
            dead = [n for n, r in stack.running.items() if r.popen.poll() is not None]
            if dead:
                raise TopologyError(f"{', '.join(dead)} exited while starting\n{stack.logs()}")
            if time.monotonic() > deadline:
                waiting = [s.ready_probe for s in specs if not stack.ready(s.name, client)]
                raise TopologyError(f"not ready after {timeout_s:.0f}s: {', '.join(waiting)}\n{stack.logs()}")
            time.sleep(0.2)
    except BaseException:
        stack.stop()
        raise
    finally:
        client.close()
    return stack
