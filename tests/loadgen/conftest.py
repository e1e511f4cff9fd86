"""Fixtures: an in-process fake OpenAI server on loopback, and the recorded streams."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
from aiohttp.test_utils import TestServer

HERE = Path(__file__).resolve().parent
FAKE_SERVER_PATH = HERE / "fake_openai.py"


def _load_fake():
    spec = importlib.util.spec_from_file_location("specrelay_tests_fake_openai", FAKE_SERVER_PATH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


fake_openai = _load_fake()


@pytest.fixture
def fake():
    return fake_openai


@pytest.fixture
async def serve_fake():
    """`await serve_fake(FakeBehaviour(...))` -> (base URL, FakeState); servers close after the test."""
    servers = []

    async def start(behaviour=None):
        server = TestServer(fake_openai.make_app(behaviour), host="127.0.0.1")
        await server.start_server()
        servers.append(server)
        return f"http://127.0.0.1:{server.port}", server.app[fake_openai.STATE]

    yield start
    for server in servers:
        await server.close()


@pytest.fixture
def fixture_path():
    return lambda name: HERE / "fixtures" / name
