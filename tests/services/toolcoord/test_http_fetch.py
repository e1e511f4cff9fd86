"""http_fetch: off unless enabled; size, time and address limits; text comes back with its status line."""

from __future__ import annotations

import asyncio

import pytest
from aiohttp import web

from specrelay.services.toolcoord.tools.base import ToolError
from specrelay.services.toolcoord.tools.http_fetch import FetchConfig, http_fetch


@pytest.fixture
async def site():
    async def text(request):
        return web.Response(text="hello from the tool server")

    async def big(request):
        return web.Response(body=b"x" * 100_000, content_type="text/plain")

    async def slow(request):
        await asyncio.sleep(2)
        return web.Response(text="late")

    async def redirect(request):
        raise web.HTTPFound("/text")

    async def loop(request):
        raise web.HTTPFound("/loop")

    app = web.Application()
    app.add_routes([web.get("/text", text), web.get("/big", big), web.get("/slow", slow),
                    web.get("/redirect", redirect), web.get("/loop", loop)])
    runner = web.AppRunner(app)
    await runner.setup()
    tcp = web.TCPSite(runner, "127.0.0.1", 0)
    await tcp.start()
    port = runner.addresses[0][1]
    yield f"http://127.0.0.1:{port}"
    await runner.cleanup()


LOCAL = FetchConfig(enabled=True, allow_private=True, timeout_s=0.5, max_bytes=1000)


async def test_disabled_by_default(site):
    with pytest.raises(ToolError, match="disabled"):
        await http_fetch(f"{site}/text")


async def test_fetches_text_and_follows_a_redirect(site):
    result = await http_fetch(f"{site}/redirect", LOCAL)
    assert result.content == "HTTP 200 text/plain, 26 bytes\n\nhello from the tool server"
    assert not result.is_error


async def test_size_time_and_redirect_limits(site):
    big = await http_fetch(f"{site}/big", LOCAL)
    assert big.content.startswith("HTTP 200 text/plain, 1000 bytes (cut at the size limit)\n\n")
    assert big.content.endswith("x" * 1000) and len(big.content) < 1100
    with pytest.raises(ToolError, match="within 0.5 s"):
        await http_fetch(f"{site}/slow", LOCAL)
    with pytest.raises(ToolError, match="redirects"):
        await http_fetch(f"{site}/loop", LOCAL)
    missing = await http_fetch(f"{site}/missing", LOCAL)
    assert missing.is_error and missing.content.startswith("HTTP 404")


async def test_private_addresses_are_refused_unless_allowed(site):
    with pytest.raises(ToolError, match="non-public address"):
        await http_fetch(f"{site}/text", FetchConfig(enabled=True))
    with pytest.raises(ToolError, match="non-public address"):
        await http_fetch("http://localhost:9/", FetchConfig(enabled=True))
    with pytest.raises(ToolError, match="absolute http"):
        await http_fetch("file:///etc/passwd", FetchConfig(enabled=True))
