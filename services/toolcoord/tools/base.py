"""What every tool shares: the error a tool raises for a bad call, and the result the model gets back."""

from __future__ import annotations

from dataclasses import dataclass

from specrelay.shared.errors import SpecrelayError


class ToolError(SpecrelayError):
    """A tool refused or failed a call. The message goes back to the model as the tool's response, so it says
    what was wrong in words the model can act on."""


@dataclass(frozen=True)
class ToolResult:
    """A tool's answer, appended to the conversation as the tool message. `is_error` marks a refused call, so
    that usage and metrics can count tool failures."""

    content: str
    is_error: bool = False
    elapsed_s: float = 0.0
