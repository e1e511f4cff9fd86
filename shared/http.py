"""What every HTTP-serving command (serve, gateway, kvstore) does the same way when it starts listening."""

from __future__ import annotations

from specrelay.shared.errors import ConfigError


async def listen(runner, host: str, port: int) -> None:
    """Start serving `runner` (a set-up aiohttp AppRunner) on host:port. A port in use or an address that cannot
    be bound is the user's setting, so it is a ConfigError (a CLI message), not a traceback."""
    from aiohttp import web

    try:
        await web.TCPSite(runner, host, port).start()
    except OSError as e:
        raise ConfigError(f"cannot listen on {host}:{port}: {e.strerror}") from None
