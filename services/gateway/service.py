"""`specrelay gateway`: the gateway as its own process, talking to verifiers over Redis (or the local bus when
another component in this process serves it).

`add_arguments` / `main` follow the CLI's command contract; `run(config)` is the entrypoint other launchers
(`specrelay serve`) can call with a config they built themselves.
"""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from specrelay.shared.errors import ConfigError

if TYPE_CHECKING:  # aiohttp stays out of `specrelay --help`
    from specrelay.services.gateway.state import GatewayConfig
    from specrelay.services.gateway.tool_rounds import ToolOptions

API_KEY_ENV = "SPECRELAY_API_KEY"  # one key, or several separated by commas
FALLBACK_MAX_MODEL_LEN = 4096


@dataclass(frozen=True)
class ServiceConfig:
    gateway: GatewayConfig
    model_dir: Path
    host: str = "127.0.0.1"
    port: int = 8000
    redis_url: str | None = None
    tools: ToolOptions | None = None  # server-side tools (tool_rounds.py); None: none


@dataclass(frozen=True)
class VerifierLimits:
    """What the verifiers behind this gateway can take, when it knows (`specrelay serve` builds its gateway from its
    verifier's): the gateway's own limits are the flags' values cut to these."""

    max_model_len: int  # the longest sequence the verifier's model serves
    max_running: int  # requests in one verifier batch: more would wait in its FIFO, out of the schedule's reach


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from specrelay.models.resolve import add_model_argument

    add_model_argument(parser)
    parser.add_argument("--served-model-name", default=None, help="the `model` clients send (default: the "
                        "model directory's name)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    from specrelay.shared.flags import add_redis_argument

    add_redis_argument(parser, from_env=False)
    parser.add_argument("--api-key", action="append", default=None, metavar="KEY",
                        help=f"require 'Authorization: Bearer KEY' on /v1 (repeatable; or ${API_KEY_ENV})")
    parser.add_argument("--max-model-len", type=int, default=None, help="context length (default: config.json)")
    parser.add_argument("--tool-call-format", default="hermes", choices=("hermes", "llama3", "auto"))
    parser.add_argument("--schedule", "--policy", dest="schedule", default="fcfs", metavar="fcfs|slo",
                        help="admission order: first come first served, or least SLO slack first (slo_policy.py)")
    parser.add_argument("--class-slo", action="append", default=None, metavar="[CLASS:]ttft=..,tpot=..,e2e=..",
                        help="per-class targets the slo schedule derives deadlines from (repeatable; default "
                             "interactive:ttft=1s,tpot=100ms deadline:e2e=30s; the loadgen's --slo language)")
    parser.add_argument("--max-running", type=int, default=256, help="requests in flight to the verifier")
    parser.add_argument("--max-queued", type=int, default=1024, help="waiting requests before 503s")
    from specrelay.services.gateway.tool_rounds import add_tool_arguments

    add_tool_arguments(parser)


def model_max_len(model_dir: Path) -> int:
    """The context length a model directory declares (config.json, else tokenizer_config.json)."""
    for name, key in (("config.json", "max_position_embeddings"), ("tokenizer_config.json", "model_max_length")):
        path = model_dir / name
        if path.is_file():
            try:
                value = json.loads(path.read_text()).get(key)
            except json.JSONDecodeError as e:
                raise ConfigError(f"{path}: not valid JSON ({e})") from None
            if isinstance(value, int) and 1 < value < 10**8:
                return value
    return FALLBACK_MAX_MODEL_LEN


def api_keys(flag_keys: list[str] | None) -> tuple[str, ...]:
    keys = list(flag_keys or [])
    keys += [k.strip() for k in os.environ.get(API_KEY_ENV, "").split(",") if k.strip()]
    if any(not k.strip() for k in keys):
        raise ConfigError("--api-key must not be empty")
    return tuple(dict.fromkeys(keys))


def sampling_defaults(model_dir: Path) -> dict[str, float]:
    """The sampling a request that names none gets: the model card's, from generation_config.json (as vLLM's
    `--generation-config auto`); SmolLM2's is temperature 0.2, top_p 0.9. Absent or unusable values keep OpenAI's."""
    try:
        found = json.loads((model_dir / "generation_config.json").read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(found, dict):
        return {}
    out = {}
    for key, name, ok in (("temperature", "default_temperature", lambda v: 0 <= v <= 2),
                          ("top_p", "default_top_p", lambda v: 0 < v <= 1)):
        value = found.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and ok(value):
            out[name] = float(value)
    return out


def build_config(args: argparse.Namespace, limits: VerifierLimits | None = None) -> ServiceConfig:
    """The gateway's config from its flags (`add_arguments`), cut to the verifiers' `limits` when known."""
    from specrelay.models.resolve import resolve_model
    from specrelay.services.gateway.state import GatewayConfig

    model_dir = resolve_model(args.model)
    max_model_len, max_running = args.max_model_len or model_max_len(model_dir), args.max_running
    if limits is not None:
        max_model_len, max_running = min(max_model_len, limits.max_model_len), min(max_running, limits.max_running)
    gateway = GatewayConfig(
        model_name=args.served_model_name or model_dir.resolve().name,
        max_model_len=max_model_len, api_keys=api_keys(args.api_key),
        tool_call_format=args.tool_call_format, policy=args.schedule, max_running=max_running,
        max_queued=args.max_queued, class_slos=tuple(args.class_slo or ()), **sampling_defaults(model_dir))
    if not 0 < args.port < 65536:
        raise ConfigError(f"--port {args.port}: not a TCP port")
    from specrelay.services.gateway.tool_rounds import tool_options

    return ServiceConfig(gateway, model_dir, args.host, args.port, args.redis, tool_options(args))


async def serve(config: ServiceConfig) -> None:
    """Serve until cancelled: the bus, the tokenizer and the HTTP site, closed in reverse order."""
    import asyncio

    from specrelay.services.gateway.app import create_app
    from specrelay.shared.bus import make_bus
    from specrelay.shared.http import app_runner, listen
    from specrelay.shared.tokenizer import Tokenizer

    from specrelay.services.gateway.kv_reports import VerifierKvReports

    tokenizer = Tokenizer(config.model_dir)
    async with make_bus(config.redis_url) as bus:
        kv_reports = VerifierKvReports()
        follower = asyncio.create_task(kv_reports.follow(bus))
        server_tools = config.tools.build(bus) if config.tools is not None else None
        runner = app_runner(create_app(config.gateway, bus, tokenizer, kv_stats=kv_reports.stats,
                                       server_tools=server_tools))
        await runner.setup()
        try:
            await listen(runner, config.host, config.port)
            print(f"specrelay gateway: serving {config.gateway.model_name!r} on "
                  f"http://{config.host}:{config.port}/v1", flush=True)
            await asyncio.Event().wait()
        finally:
            follower.cancel()
            await asyncio.gather(follower, return_exceptions=True)  # it leaves its group while the bus is open
            await runner.cleanup()


def run(config: ServiceConfig) -> int:
    import asyncio

    from specrelay.shared.stopping import serve_until_stopped

    asyncio.run(serve_until_stopped(serve(config)))
    return 0


def main(args: argparse.Namespace) -> int:
    return run(build_config(args))
