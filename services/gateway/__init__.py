"""The OpenAI-compatible gateway (chat, completions, the Responses API): validates and tokenizes requests, admits
them, streams the verifier's tokens back as text (SSE or whole), with tool calls, stop strings, usage and
Prometheus metrics in vLLM's names.

Entry points: `create_app(config, bus, tokenizer, kv_stats=None)` for an in-process app; `service.run(config)` /
`service.main(args)` for a process. Names resolve lazily so that `specrelay --help` never imports aiohttp.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "create_app": "specrelay.services.gateway.app",
    "GatewayConfig": "specrelay.services.gateway.state",
    "KvStats": "specrelay.services.gateway.metrics",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
