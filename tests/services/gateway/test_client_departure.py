"""A client that leaves before a non-streamed answer is complete: the request is cancelled at once and its KV
blocks come back (issue 18, defect 6). A non-streamed handler writes nothing until the end, so only the server's
own view of the connection can notice; before, the gateway looked only when tokens paused for 0.25 s, and an
abandoned request decoded on to max_tokens.

The gateway runs as `specrelay gateway` runs it (`service.serve`: its runner, its site), with the bus swapped for
an in-process one that the fake verifier reads; aiohttp's TestServer would not do, as it cancels departed
clients' handlers whatever production does."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import shutil
import socket
import time

import aiohttp
import pytest

from specrelay.services.gateway import service
from specrelay.shared import bus as bus_module
from specrelay.shared.bus import LocalBus

from .conftest import fake_verifier

GENEROUS_S = 30.0  # bounds for what should take milliseconds; never a timing assertion


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def eventually(condition, what: str) -> None:
    deadline = time.monotonic() + GENEROUS_S
    while not condition():
        assert time.monotonic() < deadline, what
        await asyncio.sleep(0.01)


@pytest.fixture
async def gateway_process(tokenizer_dir, tokenizer, tmp_path, monkeypatch):
    """(base URL, fake verifier) of `specrelay gateway`'s serve() on a free port, one request running at a time."""
    model_dir = tmp_path / "tiny-chat"
    shutil.copytree(tokenizer_dir, model_dir)
    (model_dir / "config.json").write_text(json.dumps({"max_position_embeddings": 4096}))
    bus = LocalBus()
    # one token per chunk, 20 ms apart: never the 0.25 s pause the old check waited for, and a whole answer
    # lasts seconds, so an abandoned request that runs on is seen finishing "length", not "cancelled"
    fake = fake_verifier.FakeVerifier(bus, tokenizer, tokens_per_chunk=1, delay_s=0.02)
    monkeypatch.setattr(bus_module, "make_bus", lambda url, config=None: bus)
    port = free_port()
    parser = argparse.ArgumentParser()
    service.add_arguments(parser)
    config = service.build_config(parser.parse_args(["--model", str(model_dir), "--port", str(port),
                                                     "--max-running", "1"]))
    tasks = [asyncio.create_task(fake.run()), asyncio.create_task(service.serve(config))]
    url = f"http://127.0.0.1:{port}"
    try:
        async with aiohttp.ClientSession() as s:
            deadline = time.monotonic() + GENEROUS_S
            while True:
                with contextlib.suppress(aiohttp.ClientConnectionError):
                    async with s.get(f"{url}/health") as r:
                        if r.status == 200:
                            break
                assert time.monotonic() < deadline, "the gateway did not start"
                await asyncio.sleep(0.05)
        yield url, fake
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def send(url: str, path: str, body: dict) -> asyncio.StreamWriter:
    """POST `body` without streaming on a connection of its own; closing the writer is the client leaving."""
    host, port = url.removeprefix("http://").split(":")
    _, writer = await asyncio.open_connection(host, int(port))
    data = json.dumps(body).encode()
    writer.write(f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
                 f"Content-Length: {len(data)}\r\n\r\n".encode() + data)
    await writer.drain()
    return writer


async def leave(writer: asyncio.StreamWriter) -> None:
    writer.close()
    await writer.wait_closed()


async def post_and_leave(url: str, path: str, body: dict, fake) -> str:
    """POST `body`, wait until the verifier has produced tokens for it, then leave without reading an answer.
    Returns the request id."""
    writer = await send(url, path, body)
    await eventually(lambda: fake.generates and fake.blocks.get(fake.generates[-1].request_id, 0) > 0,
                     "the request never reached the verifier")
    request_id = fake.generates[-1].request_id
    await leave(writer)
    return request_id


async def health(url: str) -> dict:
    async with aiohttp.ClientSession() as s, s.get(f"{url}/health") as r:
        return await r.json()


@pytest.mark.parametrize("path,body", [
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Tell me a story"}]}),
    ("/v1/completions", {"prompt": "Once upon a time"}),
])
async def test_a_non_streamed_request_whose_client_left_is_cancelled_and_frees_its_blocks(gateway_process, path,
                                                                                          body):
    url, fake = gateway_process
    request_id = await post_and_leave(url, path, {"model": "tiny-chat", "max_tokens": 2000, **body}, fake)
    await eventually(lambda: request_id in fake.finished, "the abandoned request never ended")
    assert fake.finished[request_id] == "cancelled", "the abandoned request ran on to its end"
    assert request_id in fake.cancels
    await eventually(lambda: fake.blocks_used == 0, "the abandoned request's KV blocks were not freed")
    async with aiohttp.ClientSession() as s:
        async with s.get(f"{url}/metrics") as r:
            metrics = await r.text()
        assert 'specrelay_request_finish_total{reason="client_gone"} 1' in metrics
        async with s.get(f"{url}/health") as r:
            assert (await r.json())["running"] == 0
        # and the gateway serves the next client
        async with s.post(f"{url}{path}", json={"model": "tiny-chat", "max_tokens": 3, **body}) as r:
            assert r.status == 200


async def test_a_client_that_leaves_while_queued_never_reaches_the_verifier(gateway_process):
    url, fake = gateway_process
    story = {"model": "tiny-chat", "max_tokens": 2000, "messages": [{"role": "user", "content": "A story"}]}
    running = await send(url, "/v1/chat/completions", story)
    await eventually(lambda: len(fake.generates) == 1, "the first request never reached the verifier")
    queued = await send(url, "/v1/chat/completions", story)
    deadline = time.monotonic() + GENEROUS_S
    while (await health(url))["queued"] != 1:
        assert time.monotonic() < deadline, "the second request never queued"
        await asyncio.sleep(0.01)
    await leave(queued)
    deadline = time.monotonic() + GENEROUS_S
    while (await health(url))["queued"] != 0:
        assert time.monotonic() < deadline, "the departed client stayed in the queue"
        await asyncio.sleep(0.01)
    await leave(running)
    await eventually(lambda: fake.blocks_used == 0, "the running request's KV blocks were not freed")
    assert len(fake.generates) == 1, "the departed client's request was sent to the verifier"
    assert (await health(url))["running"] == 0
