"""`http_fetch`: GET a URL for the model. Off unless the tools config enables it.

Limits: http(s) only, a total time limit, a cap on bytes read (the rest is never downloaded), at most 3
redirects (followed by hand). Host names are checked where they are resolved (a resolver wrapped around
aiohttp's, so DNS rebinding gains nothing) and IP literals before each hop, so neither a URL nor a redirect can
reach loopback, private, link-local or reserved addresses unless `allow_private` is set (tests, and deployments
that fetch from their own network).
"""

from __future__ import annotations

import ipaddress
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from specrelay.services.toolcoord.tools.base import ToolError, ToolResult

SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {"url": {"type": "string", "description": "an http:// or https:// URL"}},
    "required": ["url"],
}
DESCRIPTION = "Fetch a web page or API response by HTTP GET and return its text (size and time limited)."

MAX_REDIRECTS = 3
_TEXT_TYPES = ("text/", "application/json", "application/xml", "application/javascript", "application/x-yaml")


@dataclass(frozen=True)
class FetchConfig:
    enabled: bool = False
    timeout_s: float = 10.0
    max_bytes: int = 256 * 1024
    allow_private: bool = False
    user_agent: str = "specrelay-http-fetch"


def _is_public(address: str) -> bool:
    ip = ipaddress.ip_address(address.split("%")[0])
    return ip.is_global and not ip.is_multicast


def _check_literal_host(url: str, allow_private: bool) -> None:
    host = urlsplit(url).hostname or ""
    try:
        ipaddress.ip_address(host.split("%")[0])
    except ValueError:
        return  # a name: the resolver checks what it resolves to
    if not allow_private and not _is_public(host):
        raise ToolError(f"refused: {host} is a non-public address")


def _checking_resolver(allow_private: bool):
    from aiohttp.resolver import DefaultResolver

    class CheckingResolver(DefaultResolver):
        async def resolve(self, host: str, port: int = 0, family: int = 0) -> list[dict[str, Any]]:
            hosts = await super().resolve(host, port, family)
            if not allow_private:
                for entry in hosts:
                    if not _is_public(entry["host"]):
                        raise ToolError(f"refused: {host} resolves to a non-public address ({entry['host']})")
            return hosts

    return CheckingResolver()


async def http_fetch(url: str, config: FetchConfig = FetchConfig()) -> ToolResult:
    if not config.enabled:
        raise ToolError("http_fetch is disabled on this server")
    if not isinstance(url, str) or urlsplit(url).scheme not in ("http", "https") or not urlsplit(url).hostname:
        raise ToolError("url must be an absolute http:// or https:// URL")
    import aiohttp
    from yarl import URL

    started = time.monotonic()
    timeout = aiohttp.ClientTimeout(total=config.timeout_s)
    connector = aiohttp.TCPConnector(resolver=_checking_resolver(config.allow_private), force_close=True)
    try:
        async with aiohttp.ClientSession(timeout=timeout, connector=connector,
                                         headers={"User-Agent": config.user_agent}) as session:
            # Redirects by hand: aiohttp does not resolve IP literals, so each hop's literal is checked here.
            for _ in range(MAX_REDIRECTS + 1):
                _check_literal_host(url, config.allow_private)
                async with session.get(url, allow_redirects=False) as response:
                    if response.status in (301, 302, 303, 307, 308) and "Location" in response.headers:
                        url = str(response.url.join(URL(response.headers["Location"])))
                        if urlsplit(url).scheme not in ("http", "https"):
                            raise ToolError(f"refused: redirect to {url}")
                        continue
                    status, content_type = response.status, response.content_type
                    charset = response.charset or "utf-8"
                    body = bytearray()
                    async for chunk in response.content.iter_chunked(65536):
                        body += chunk
                        if len(body) > config.max_bytes:
                            break
                    break
            else:
                raise ToolError(f"more than {MAX_REDIRECTS} redirects")
    except ToolError:
        raise
    except TimeoutError:
        raise ToolError(f"no complete answer within {config.timeout_s:g} s") from None
    except aiohttp.ClientError as e:
        raise ToolError(f"fetch failed: {e}") from None
    truncated = len(body) > config.max_bytes
    del body[config.max_bytes:]
    header = f"HTTP {status} {content_type}, {len(body)} bytes" + (" (cut at the size limit)" if truncated else "")
    if not content_type.startswith(_TEXT_TYPES):
        return ToolResult(content=f"{header}; binary content not shown", is_error=status >= 400,
                          elapsed_s=time.monotonic() - started)
    text = bytes(body).decode(charset, errors="replace")
    return ToolResult(content=f"{header}\n\n{text}", is_error=status >= 400, elapsed_s=time.monotonic() - started)
