"""What every HTTP-serving command (serve, gateway, kvstore) does the same way when it starts listening."""

from __future__ import annotations

from specrelay.shared.errors import ConfigError


def app_runner(app):
    """The runner for `app`. A handler whose client disconnects is cancelled at once (aiohttp's
    handler_cancellation, off by default since 3.7): a non-streamed answer writes nothing until it is complete, so
    otherwise nothing would notice the client leaving and the request would decode to max_tokens for nobody,
    holding its KV blocks. aiohttp's TestServer turns this on too, so tests serve the way production does."""
    from aiohttp import web

    return web.AppRunner(app, handler_cancellation=True)


async def listen(runner, host: str, port: int) -> None:
    """Start serving `runner` (a set-up aiohttp AppRunner) on host:port. A port in use or an address that cannot
    be bound is the user's setting, so it is a ConfigError (a CLI message), not a traceback."""
    from aiohttp import web

    try:
        await web.TCPSite(runner, host, port).start()
    except OSError as e:
        raise ConfigError(f"cannot listen on {host}:{port}: {e.strerror}") from None
