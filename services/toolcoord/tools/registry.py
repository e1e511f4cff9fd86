"""The server-side tool registry: built-ins, tools named in a config file, tools from installed packages.

Config file (TOML or JSON, same keys):

    [builtins]
    calculator = true
    python = { timeout_s = 10, cpu_s = 5, memory_bytes = 536870912 }   # unsafe_no_sandbox = true: see below
    http_fetch = { enabled = true, timeout_s = 10, max_bytes = 262144 }

    [[tools]]
    name = "weather"
    target = "mypkg.tools:get_weather"          # module:function, sync or async, keyword arguments
    description = "Current weather for a city"
    parameters = { type = "object", properties = { city = { type = "string" } }, required = ["city"] }

calculator and python are on by default; http_fetch is off unless enabled. python runs in a bubblewrap sandbox;
where bwrap is missing or cannot create namespaces the tool is not offered, the reason is logged, and a call to it
gets that reason. `unsafe_no_sandbox = true` in its table runs it on the host instead (rlimits, audit hook, and a
network namespace where allowed): only for a host whose every user may run code as the server.

Packages can also expose tools under the entry-point group `specrelay.tools`: each entry point loads either a
`Tool` or a function (its docstring is the description, an optional `parameters` attribute the JSON schema),
loaded only when `entry_points = true`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import importlib
import inspect
import json
import logging
import time
import tomllib
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any, Awaitable, Callable, Mapping

from specrelay.services.toolcoord.tools import calculator as calculator_mod
from specrelay.services.toolcoord.tools import http_fetch as http_fetch_mod
from specrelay.services.toolcoord.tools import python_tool
from specrelay.services.toolcoord.tools.base import ToolError, ToolResult
from specrelay.services.toolcoord.tools.sandbox import SandboxUnavailable, find_sandbox
from specrelay.shared.errors import ConfigError

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "specrelay.tools"
ToolFunction = Callable[..., Any] | Callable[..., Awaitable[Any]]


@dataclass(frozen=True)
class Tool:
    name: str
    description: str
    parameters: dict[str, Any]  # JSON schema of the arguments object
    function: ToolFunction  # called with the arguments as keywords; returns str or ToolResult

    def schema(self) -> dict[str, Any]:
        """The OpenAI `tools` entry for this tool."""
        return {"type": "function",
                "function": {"name": self.name, "description": self.description, "parameters": self.parameters}}


@dataclass
class ToolRegistry:
    tools: dict[str, Tool] = field(default_factory=dict)
    # Tools configured but not offered, with why (the python tool without a sandbox): a call gets the reason.
    unavailable: dict[str, str] = field(default_factory=dict)

    def register(self, tool: Tool) -> None:
        if not tool.name.replace("_", "").replace("-", "").isalnum():
            raise ConfigError(f"tool name {tool.name!r}: use letters, digits, '_' and '-'")
        if tool.name in self.tools:
            raise ConfigError(f"tool {tool.name!r} is registered twice")
        self.tools[tool.name] = tool

    def __contains__(self, name: str) -> bool:
        return name in self.tools

    def schemas(self) -> list[dict[str, Any]]:
        return [tool.schema() for tool in self.tools.values()]

    async def call(self, name: str, arguments: str | Mapping[str, Any]) -> ToolResult:
        """Run a tool. Never raises for the model's mistakes or the tool's failures: those come back as an
        error result, which the model reads as the tool's answer."""
        started = time.monotonic()
        tool = self.tools.get(name)
        try:
            if tool is None:
                if name in self.unavailable:
                    raise ToolError(self.unavailable[name])
                raise ToolError(f"no server-side tool named {name!r}")
            args = json.loads(arguments) if isinstance(arguments, str) else dict(arguments)
            if not isinstance(args, dict):
                raise ToolError("arguments must be a JSON object")
            _check_required(tool, args)
            if inspect.iscoroutinefunction(tool.function):
                value = await tool.function(**args)
            else:
                value = await asyncio.to_thread(tool.function, **args)
        except ToolError as e:
            return ToolResult(content=f"error: {e}", is_error=True, elapsed_s=time.monotonic() - started)
        except ValueError as e:
            return ToolResult(content=f"error: arguments are not valid JSON: {e}", is_error=True,
                              elapsed_s=time.monotonic() - started)
        except TypeError as e:  # wrong or missing keyword arguments
            return ToolResult(content=f"error: bad arguments for {name}: {e}", is_error=True,
                              elapsed_s=time.monotonic() - started)
        except Exception as e:  # a third-party tool's bug must not take the coordinator down
            return ToolResult(content=f"error: {name} failed: {type(e).__name__}: {e}", is_error=True,
                              elapsed_s=time.monotonic() - started)
        if isinstance(value, ToolResult):
            return dataclasses.replace(value, elapsed_s=time.monotonic() - started)
        text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False, default=str)
        return ToolResult(content=text, elapsed_s=time.monotonic() - started)


def _check_required(tool: Tool, args: Mapping[str, Any]) -> None:
    missing = [k for k in tool.parameters.get("required", []) if k not in args]
    if missing:
        raise ToolError(f"{tool.name}: missing argument(s) {', '.join(missing)}")
    allowed = tool.parameters.get("properties")
    if isinstance(allowed, dict) and tool.parameters.get("additionalProperties", True) is False:
        extra = [k for k in args if k not in allowed]
        if extra:
            raise ToolError(f"{tool.name}: unknown argument(s) {', '.join(extra)}")


def _options(value: Any, what: str) -> dict[str, Any] | None:
    """A builtin's setting: false/absent -> None (off), true -> {}, a table -> its options."""
    if value is False or value is None:
        return None
    if value is True:
        return {}
    if isinstance(value, dict):
        return None if value.get("enabled", True) is False else {k: v for k, v in value.items() if k != "enabled"}
    raise ConfigError(f"tools config: builtins.{what} must be true, false or a table of options")


def _dataclass_from(cls: type, options: dict[str, Any], what: str) -> Any:
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise ConfigError(f"tools config: builtins.{what}: unknown option(s) {', '.join(unknown)}")
    return cls(**options)


def builtin_registry(builtins: Mapping[str, Any] | None = None) -> ToolRegistry:
    builtins = dict(builtins or {})
    registry = ToolRegistry()
    if _options(builtins.pop("calculator", True), "calculator") is not None:
        registry.register(Tool("calculator", calculator_mod.DESCRIPTION, calculator_mod.SCHEMA,
                               calculator_mod.calculator))
    if (opts := _options(builtins.pop("python", True), "python")) is not None:
        _add_python(registry, opts)
    if (opts := _options(builtins.pop("http_fetch", False), "http_fetch")) is not None:
        fetch_config = _dataclass_from(http_fetch_mod.FetchConfig, {**opts, "enabled": True}, "http_fetch")

        async def http_fetch(url: str) -> ToolResult:
            return await http_fetch_mod.http_fetch(url, fetch_config)

        registry.register(Tool("http_fetch", http_fetch_mod.DESCRIPTION, http_fetch_mod.SCHEMA, http_fetch))
    if builtins:
        raise ConfigError(f"tools config: unknown builtin(s) {', '.join(sorted(builtins))}")
    return registry


def _add_python(registry: ToolRegistry, opts: dict[str, Any]) -> None:
    unsafe = opts.pop("unsafe_no_sandbox", False)
    if not isinstance(unsafe, bool):
        raise ConfigError("tools config: builtins.python.unsafe_no_sandbox must be true or false")
    limits = _dataclass_from(python_tool.PythonLimits, opts, "python")
    if unsafe:
        log.warning("python tool: unsafe_no_sandbox = true, model-written code runs on this host as this user, "
                    "with rlimits and an audit hook only")
    else:
        try:
            find_sandbox()
        except SandboxUnavailable as e:
            # Never fall back to running unsandboxed: the operator decides that, by name, in the config.
            log.error("python tool disabled: %s (or set unsafe_no_sandbox = true in the tools config)", e)
            registry.unavailable["python"] = f"the python tool is unavailable on this server: {e}"
            return

    async def python(code: str) -> ToolResult:
        return await python_tool.run_python(code, limits, unsafe_no_sandbox=unsafe)

    registry.register(Tool("python", python_tool.DESCRIPTION, python_tool.SCHEMA, python))


def load_target(target: str) -> Any:
    module_name, sep, attr = target.partition(":")
    if not sep or not module_name or not attr:
        raise ConfigError(f"tool target {target!r}: expected 'module:function'")
    try:
        obj: Any = importlib.import_module(module_name)
        for part in attr.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"tool target {target!r} cannot be loaded: {e}") from e
    return obj


def tool_from_object(obj: Any, name: str, description: str | None = None,
                     parameters: dict[str, Any] | None = None) -> Tool:
    if isinstance(obj, Tool):
        return obj
    if not callable(obj):
        raise ConfigError(f"tool {name!r}: {obj!r} is neither a Tool nor a function")
    schema = parameters or getattr(obj, "parameters", None) or {"type": "object", "properties": {}}
    return Tool(name, description or inspect.getdoc(obj) or name, schema, obj)


def load_registry(path: str | Path | None = None, use_entry_points: bool | None = None) -> ToolRegistry:
    """The registry the server runs: built-ins, plus config-file and entry-point tools."""
    config: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        try:
            text = path.read_text()
            config = tomllib.loads(text) if path.suffix == ".toml" else json.loads(text)
        except (OSError, ValueError) as e:  # tomllib.TOMLDecodeError and JSONDecodeError are ValueErrors
            raise ConfigError(f"cannot read tools config {path}: {e}") from e
    unknown = sorted(set(config) - {"builtins", "tools", "entry_points"})
    if unknown:
        raise ConfigError(f"tools config: unknown key(s) {', '.join(unknown)}")
    registry = builtin_registry(config.get("builtins"))
    for entry in config.get("tools", []):
        if not isinstance(entry, dict) or "name" not in entry or "target" not in entry:
            raise ConfigError("tools config: each [[tools]] entry needs name and target")
        registry.register(tool_from_object(load_target(entry["target"]), entry["name"], entry.get("description"),
                                           entry.get("parameters")))
    if use_entry_points if use_entry_points is not None else config.get("entry_points", False):
        for ep in entry_points(group=ENTRY_POINT_GROUP):
            registry.register(tool_from_object(ep.load(), ep.name))
    return registry
