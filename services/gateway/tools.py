"""The server-side tools a gateway offers inside chat requests (`--server-tools`): their registry, who runs the
calls, and the limits of a request's tool rounds (tool_rounds.py runs them).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

from specrelay.services.toolcoord.tools.base import ToolResult
from specrelay.services.toolcoord.tools.registry import ToolRegistry
from specrelay.services.toolcoord.trim import TrimConfig
from specrelay.shared.errors import ConfigError


class ToolRunner(Protocol):
    async def call(self, name: str, arguments: str) -> ToolResult: ...


@dataclass(frozen=True)
class ServerTools:
    registry: ToolRegistry  # names and schemas (always local)
    runner: ToolRunner  # who runs the calls: the registry itself, or RemoteTools(bus)
    trim: TrimConfig = field(default_factory=TrimConfig)
    max_rounds: int = 4  # server-side rounds in one request
    hold_s: float = 30.0  # how long the verifier keeps a turn's KV for the round's Continue (tool time included)
    continue_timeout_s: float = 5.0  # no first chunk of a Continue by then: its holder is gone, fall back

    def __post_init__(self) -> None:
        if self.max_rounds < 0:
            raise ConfigError(f"--max-tool-rounds {self.max_rounds}: must be >= 0")
        if not self.hold_s > 0:
            raise ConfigError(f"--tool-hold-s {self.hold_s}: must be > 0")
        if not self.continue_timeout_s > 0:
            raise ConfigError(f"--tool-continue-timeout-s {self.continue_timeout_s}: must be > 0")

    def template_tools(self, client_tools: list[dict[str, Any]] | None) -> list[dict[str, Any]] | None:
        """The client's tools, then the server's under names the client did not take."""
        taken = {t["function"]["name"] for t in client_tools or []}
        extra = [s for s in self.registry.schemas() if s["function"]["name"] not in taken]
        return [*(client_tools or []), *extra] or None


# A turn offered client tools is held until the gateway has parsed it (moments after its last token): if it called
# them, the hold is handed to the verifier's retention policy with the tools' names; if not, it is released.
CLIENT_TOOL_HOLD_S = 10.0
