"""The OpenAI-compatible gateway: validates and tokenizes requests, admits them, streams the verifier's tokens
back as text (SSE or whole), with tool calls, stop strings, usage and Prometheus metrics.

Entry points: `create_app(config, bus, tokenizer)` for an in-process app, `service.run(config)` for a process.
"""

from specrelay.services.gateway.app import create_app
from specrelay.services.gateway.metrics import KvStats
from specrelay.services.gateway.state import GatewayConfig

__all__ = ["GatewayConfig", "KvStats", "create_app"]
