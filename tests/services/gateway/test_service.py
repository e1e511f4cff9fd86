"""`specrelay gateway` as a process entrypoint: flags -> config, and serving on a real port."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import shutil
import socket

import aiohttp
import pytest

from specrelay.services.gateway import service
from specrelay.shared.errors import ConfigError


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    service.add_arguments(parser)
    return parser.parse_args(list(argv))


@pytest.fixture
def model_dir(tokenizer_dir, tmp_path):
    path = tmp_path / "my-model"
    shutil.copytree(tokenizer_dir, path)
    (path / "config.json").write_text(json.dumps({"max_position_embeddings": 1024}))
    return path


def test_flags_become_the_config(model_dir, monkeypatch):
    monkeypatch.setenv(service.API_KEY_ENV, "sk-env-1, sk-env-2")
    config = service.build_config(parse("--model", str(model_dir), "--api-key", "sk-flag", "--port", "9001",
                                        "--max-running", "8"))
    assert config.gateway.model_name == "my-model"
    assert config.gateway.max_model_len == 1024  # from config.json
    assert config.gateway.api_keys == ("sk-flag", "sk-env-1", "sk-env-2")
    assert (config.port, config.gateway.max_running) == (9001, 8)
    named = service.build_config(parse("--model", str(model_dir), "--served-model-name", "chat",
                                       "--max-model-len", "300"))
    assert (named.gateway.model_name, named.gateway.max_model_len) == ("chat", 300)


def test_a_request_without_sampling_gets_the_model_cards(model_dir):
    """As vLLM's --generation-config auto: SmolLM2's card says temperature 0.2, top_p 0.9; OpenAI's 1.0 otherwise."""
    plain = service.build_config(parse("--model", str(model_dir))).gateway
    assert (plain.default_temperature, plain.default_top_p) == (1.0, 1.0)
    (model_dir / "generation_config.json").write_text(json.dumps({"do_sample": True, "temperature": 0.2,
                                                                   "top_p": 0.9}))
    card = service.build_config(parse("--model", str(model_dir))).gateway
    assert (card.default_temperature, card.default_top_p) == (0.2, 0.9)
    (model_dir / "generation_config.json").write_text(json.dumps({"temperature": "hot", "top_p": 0}))
    odd = service.build_config(parse("--model", str(model_dir))).gateway
    assert (odd.default_temperature, odd.default_top_p) == (1.0, 1.0)


@pytest.mark.parametrize("argv,message", [
    (("--model", "/nonexistent/model"), "not a directory"),
    (("--port", "70000"), "not a TCP port"),
    (("--policy", "lottery"), "admission policy 'lottery'"),
    (("--max-running", "0"), "max_running"),
])
def test_bad_flags_are_one_line_errors(model_dir, argv, message):
    args = parse("--model", str(model_dir), *argv)
    with pytest.raises(ConfigError, match=message):
        service.build_config(args)


def test_tool_flags_become_the_server_tools(model_dir):
    from specrelay.services.gateway.tool_rounds import tool_options
    from specrelay.shared.bus import LocalBus

    tools = tool_options(parse("--model", str(model_dir), "--server-tools", "--tool-hold-s", "20",
                               "--tool-continue-timeout-s", "2.5")).build(LocalBus())
    assert (tools.hold_s, tools.continue_timeout_s) == (20.0, 2.5)
    assert tool_options(parse("--model", str(model_dir), "--server-tools")).build(LocalBus()).continue_timeout_s == 5
    with pytest.raises(ConfigError, match="--tool-continue-timeout-s 0.0: must be > 0"):
        tool_options(parse("--model", str(model_dir), "--server-tools", "--tool-continue-timeout-s", "0")).build(
            LocalBus())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def test_serves_on_a_port_with_api_keys(model_dir):
    port = _free_port()
    config = service.build_config(parse("--model", str(model_dir), "--port", str(port), "--api-key", "sk-1"))
    task = asyncio.create_task(service.serve(config))
    base = f"http://127.0.0.1:{port}"
    try:
        async with aiohttp.ClientSession() as s:
            for _ in range(100):
                with contextlib.suppress(aiohttp.ClientConnectionError):
                    async with s.get(f"{base}/health") as r:
                        assert r.status == 200
                        break
                await asyncio.sleep(0.05)
            else:
                pytest.fail("the gateway did not start")
            async with s.get(f"{base}/v1/models") as r:
                assert r.status == 401
            async with s.get(f"{base}/v1/models", headers={"Authorization": "Bearer sk-1"}) as r:
                assert [m["id"] for m in (await r.json())["data"]] == ["my-model"]
            # a second gateway on the same port fails with a one-line error, not a trace
            with pytest.raises(ConfigError, match=f"cannot listen on 127.0.0.1:{port}"):
                await service.serve(config)
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
