"""What the client may see of a turn's tool calls: the server's calls hidden, the client's renumbered from 0, and
with `parallel_tool_calls: false` at most one call (a forced tool_choice's grammar writes one; with tool_choice
auto the model may write several, and the calls past the first are dropped).
"""

from __future__ import annotations

from typing import Any

from specrelay.services.toolcoord.toolcalls import StreamDelta


class ClientView:
    """One turn's parser output as the client may see it: the server's calls hidden, the client's renumbered."""

    def __init__(self, server_names: set[str]):
        self.server_names = server_names
        self.index: dict[int, int | None] = {}  # parser index -> client index (None: a server call)

    def delta(self, sd: StreamDelta) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if sd.content:
            out["content"] = sd.content
        calls = []
        for d in sd.tool_calls:
            if d.index not in self.index:  # a call's first delta carries its name
                hidden = d.name in self.server_names
                self.index[d.index] = None if hidden else sum(v is not None for v in self.index.values())
            if (i := self.index[d.index]) is not None:
                calls.append({**d.to_openai(), "index": i})
        if calls:
            out["tool_calls"] = calls
        errors = [e.to_dict() for e in sd.errors]
        for e in errors:
            if "index" in e:
                if self.index.get(e["index"]) is None:
                    e.pop("index")  # the call never reached the client: nothing to drop there
                else:
                    e["index"] = self.index[e["index"]]
        if errors:
            out["tool_call_errors"] = errors
        return out


def within(delta: dict[str, Any], max_calls: int | None) -> dict[str, Any]:
    """`delta` (or a whole message) with the calls past the first `max_calls` dropped (None: no limit)."""
    if max_calls is None:
        return delta
    out = dict(delta)
    if "tool_calls" in out:
        calls = [c for i, c in enumerate(out.pop("tool_calls")) if c.get("index", i) < max_calls]
        if calls:
            out["tool_calls"] = calls
    if "tool_call_errors" in out:  # an error about a dropped call names no call the client has
        out["tool_call_errors"] = [{k: v for k, v in e.items() if k != "index" or v < max_calls}
                                   for e in out["tool_call_errors"]]
    return out
