"""compose.yaml and the Dockerfile as `docker compose up` would read them, checked without Docker: every service
runs a real `specrelay` command, the stack waits on health, settings come from the environment, and the verifier
can be scaled. That the commands serve the OpenAI API together is shown by the SDK tests in their `compose` mode
(tests/services/gateway/conftest.py starts exactly these commands)."""

from __future__ import annotations

import importlib.util
import shlex
import sys
from pathlib import Path

import pytest

from specrelay.cli import COMMANDS, build_parser

HERE = Path(__file__).parent
ROOT = HERE.parents[1]


def _load_live_servers():
    spec = importlib.util.spec_from_file_location("specrelay_tests_live_servers", HERE / "gateway" / "live_servers.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


live_servers = _load_live_servers()


@pytest.fixture(scope="module")
def services() -> dict[str, dict]:
    return live_servers.compose_services(ROOT / "compose.yaml")


def test_the_stack_is_redis_and_the_specrelay_services_from_one_image(services):
    assert services["redis"]["image"].startswith("redis:7")
    assert services["redis"]["healthcheck"]["test"] == ["CMD", "redis-cli", "ping"]
    ours = {name: s for name, s in services.items() if name != "redis"}
    assert set(ours) == {"gateway", "verifier", "drafter", "kvstore", "toolcoord"}
    assert {s["image"] for s in ours.values()} == {"specrelay:latest"}
    assert {s["build"] for s in ours.values()} == {"."}
    for name, service in ours.items():
        assert service["depends_on"]["redis"]["condition"] == "service_healthy", name


def test_every_command_parses_as_a_specrelay_command(services):
    parser = build_parser()
    for c in live_servers.compose_commands("redis://127.0.0.1:6379/0"):
        args = parser.parse_args(c.argv[1:])  # argparse exits (SystemExit) on a flag the command does not take
        assert args.command in COMMANDS, c.service
        redis_url = getattr(args, "redis", None) or c.env.get("SPECRELAY_REDIS")
        assert redis_url == "redis://127.0.0.1:6379/0", f"{c.service} would not find Redis"


@pytest.mark.parametrize("name", ["gateway", "kvstore"])
def test_http_services_listen_beyond_their_container_and_are_healthchecked_on_health(services, name):
    argv = services[name]["command"]
    assert argv[argv.index("--host") + 1] == "0.0.0.0"
    container_port = argv[argv.index("--port") + 1]
    probe = " ".join(services[name]["healthcheck"]["test"])
    assert f"127.0.0.1:{container_port}/health" in probe


def test_the_gateway_publishes_port_8000(services):
    gateway = services["gateway"]
    container_port = gateway["command"][gateway["command"].index("--port") + 1]
    assert [p.rsplit(":", 1)[1] for p in gateway["ports"]] == [container_port]
    assert live_servers.interpolate(gateway["ports"][0], {}) == f"8000:{container_port}"
    assert live_servers.interpolate(gateway["ports"][0], {"SPECRELAY_PORT": "9000"}) == f"9000:{container_port}"


@pytest.mark.parametrize("name", ["verifier", "drafter", "toolcoord"])
def test_workers_can_be_scaled(services, name):
    # `docker compose up --scale verifier=N` refuses services with a fixed name or a published host port
    assert "container_name" not in services[name]
    assert "ports" not in services[name]


def test_settings_come_from_the_environment(services):
    commands = {c.service: c for c in live_servers.compose_commands("redis://r:1/0")}
    assert "SPECRELAY_API_KEY" in services["gateway"]["environment"]
    assert live_servers.interpolate(services["gateway"]["environment"]["SPECRELAY_API_KEY"], {}) == ""
    drafter_argv = services["drafter"]["command"]
    proposer = drafter_argv[drafter_argv.index("--proposer") + 1]
    assert live_servers.interpolate(proposer, {}) == "recycle"  # SmolLM2 has no draft model
    assert live_servers.interpolate(proposer, {"SPECRELAY_PROPOSER": "tree"}) == "tree"
    for name in ("gateway", "verifier", "drafter"):  # one model, the same in every service
        argv = services[name]["command"]
        assert live_servers.interpolate(argv[argv.index("--model") + 1], {}) == "smollm2-135m-instruct", name
    assert commands["verifier"].argv[commands["verifier"].argv.index("--model") + 1] == str(live_servers.PAIR_TARGET)
    assert commands["verifier"].env["OMP_NUM_THREADS"] == "1"  # the tests' SPECRELAY_THREADS, through compose
    assert live_servers.interpolate(services["kvstore"]["environment"]["SPECRELAY_KV_CAPACITY"], {}) == "2G"


def test_interpolation_follows_compose(services):
    env = {"SET": "x", "EMPTY": ""}
    assert live_servers.interpolate("${SET:-d}/${EMPTY:-d}/${UNSET:-d}", env) == "x/d/d"
    assert live_servers.interpolate("${EMPTY-d}/${UNSET-d}/${UNSET}", env) == "/d/"


def test_the_dockerfile_builds_one_image_that_runs_specrelay():
    lines = [line.strip() for line in (ROOT / "Dockerfile").read_text().splitlines()
             if line.strip() and not line.lstrip().startswith("#")]
    assert lines[0] == "FROM python:3.11-slim"
    runs = [line for line in lines if line.startswith("RUN ")]
    assert "torch==2.13.0" in shlex.split(runs[0])  # torch first, pinned, before the project can pull another
    assert any("pip install -e /app torch==2.13.0" in r for r in runs[1:])
    assert "COPY . /app" in lines
    assert 'ENTRYPOINT ["specrelay"]' in lines
    assert not any("://" in line for line in lines)  # no registry hosts in our text


def test_the_image_context_keeps_models_and_leaves_out_the_venv():
    ignored = {line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")}
    assert {".venv", ".git", "tests"} <= ignored
    assert not any(pattern.startswith("models") for pattern in ignored)
    assert (ROOT / "models" / "target" / "config.json").is_file()


def _names_of(client, pids: list[int]) -> list[str]:
    """Streams, groups and consumers on the bus whose name ends with one of `pids` (services name theirs by host
    and pid)."""
    names = []
    for key in client.scan_iter(match=f"{live_servers.BUS_PREFIX}stream:*", _type="stream"):
        names.append(key.decode())
        for group in client.xinfo_groups(key):
            names.append(group["name"].decode())
            names += [c["name"].decode() for c in client.xinfo_consumers(key, group["name"])]
    return sorted(n for n in names if any(n.endswith(f"-{pid}") for pid in pids))


def test_docker_stop_exits_cleanly_and_leaves_no_group_consumer_or_stream_of_its_processes(redis_url, tmp_path):
    """`docker stop` sends SIGTERM. Every service exits 0 after giving back what it holds: nothing named for one of
    its processes stays on the bus, where restarts (new pids) would pile them up."""
    import json
    import urllib.request

    import redis

    client = redis.Redis.from_url(redis_url)
    server = live_servers.start_compose(redis_url, tmp_path)
    try:
        body = {"model": "target", "temperature": 0, "max_tokens": 8, "messages": [{"role": "user", "content": "Hi"}]}
        request = urllib.request.Request(f"{server.url}/v1/chat/completions", json.dumps(body).encode(),
                                         {"content-type": "application/json"})
        with urllib.request.urlopen(request, timeout=120) as response:
            assert response.status == 200 and json.load(response)["choices"][0]["finish_reason"]
        pids = [p.popen.pid for p in server.processes]
        running = _names_of(client, pids)
        for service in ("verifier", "drafter", "toolcoord", "gateway"):  # what a stopped stack must take away
            assert any(n.startswith(f"{service}-") for n in running), (service, running)
    finally:
        server.stop()
    try:
        assert {p.name: p.popen.returncode for p in server.processes} == {p.name: 0 for p in server.processes}, \
            server.logs()
        assert _names_of(client, pids) == []
    finally:
        client.close()
