"""A live `specrelay serve` on the small pair, in this process: the gateway, verifier and drafter on their own event
loop in a thread, listening on a free loopback port, so that synchronous clients (langchain, litellm) and
asynchronous ones (openai-agents) talk to it over HTTP as they would to any server. One server for all the client
tests (started by the first that asks, seconds on a loaded CPU); idle, it waits on its bus and costs no CPU."""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import threading
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PAIR_TARGET = ROOT / "models" / "target"
STARTUP_TIMEOUT_S = 120.0
WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Get the current weather for a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "description": "City name"}},
                   "required": ["city"]}}}
ASK_WEATHER = "What's the weather in Paris?"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class InProcessServer:
    def __init__(self):
        from specrelay.services import serve

        parser = argparse.ArgumentParser()
        serve.add_arguments(parser)
        self.port = _free_port()
        self.args = parser.parse_args(["--model", str(PAIR_TARGET), "--host", "127.0.0.1", "--port", str(self.port)])
        self.url = f"http://127.0.0.1:{self.port}"
        self.loop = asyncio.new_event_loop()
        self.task: asyncio.Task | None = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="specrelay-serve", daemon=True)

    def _run(self) -> None:
        from specrelay.services import serve
        from specrelay.services.config import build_serve

        asyncio.set_event_loop(self.loop)
        self.task = self.loop.create_task(serve.serve(build_serve(self.args)))
        try:
            self.loop.run_until_complete(self.task)
        except asyncio.CancelledError:
            pass
        except BaseException as e:  # noqa: BLE001 - shown by the test that waits for the server
            self.error = e
        finally:
            self.loop.close()

    def start(self) -> None:
        self.thread.start()
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.error is not None or not self.thread.is_alive():
                raise RuntimeError(f"specrelay serve did not start: {self.error!r}")
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=1) as r:
                    if r.status == 200:
                        return
            except OSError:
                time.sleep(0.1)
        raise RuntimeError(f"specrelay serve did not answer /health within {STARTUP_TIMEOUT_S} s")

    def stop(self) -> None:
        if self.task is not None and not self.loop.is_closed():
            self.loop.call_soon_threadsafe(self.task.cancel)
        self.thread.join(timeout=30)


@pytest.fixture(scope="session")
def server_url() -> str:
    """Base URL (no /v1) of a live `specrelay serve` on the small pair; no API key asked."""
    with pytest.MonkeyPatch.context() as mp:
        for name in [n for n in os.environ if n.startswith("SPECRELAY_") and n != "SPECRELAY_CACHE_DIR"]:
            mp.delenv(name)
        server = InProcessServer()
        server.start()
    try:
        yield server.url
    finally:
        server.stop()


@pytest.fixture(scope="session")
def model_name(server_url) -> str:
    import json

    with urllib.request.urlopen(f"{server_url}/v1/models", timeout=10) as r:
        return json.load(r)["data"][0]["id"]
