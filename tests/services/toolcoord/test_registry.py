"""The tool registry: built-ins, config-file and entry-point tools, OpenAI schemas, errors as tool answers."""

from __future__ import annotations

import json

import pytest

from specrelay.services.toolcoord.tools.registry import builtin_registry, load_registry
from specrelay.shared.errors import ConfigError

MODULE = '''
import asyncio

def weather(city: str) -> str:
    """Current weather for a city."""
    return f"sunny in {city}"

async def add(a: int, b: int) -> dict:
    await asyncio.sleep(0)
    return {"sum": a + b}
add.parameters = {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
                  "required": ["a", "b"], "additionalProperties": False}

def broken() -> str:
    raise RuntimeError("tool bug")
'''


@pytest.fixture
def user_tools(tmp_path, monkeypatch):
    (tmp_path / "my_tools.py").write_text(MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path


def test_builtins_by_default_and_http_fetch_off():
    registry = builtin_registry()
    assert [s["function"]["name"] for s in registry.schemas()] == ["calculator", "python"]
    calc = registry.schemas()[0]
    assert calc["type"] == "function" and calc["function"]["parameters"]["required"] == ["expression"]


async def test_calls_return_results_and_errors_never_raise():
    registry = builtin_registry()
    assert (await registry.call("calculator", '{"expression": "6 * 7"}')).content == "42"
    refused = await registry.call("calculator", {"expression": "__import__('os')"})
    assert refused.is_error and refused.content.startswith("error: only these functions may be called")
    for name, args, message in [
        ("nope", "{}", "error: no server-side tool named 'nope'"),
        ("calculator", "{not json", "error: arguments are not valid JSON"),
        ("calculator", "[1]", "error: arguments must be a JSON object"),
        ("calculator", "{}", "error: calculator: missing argument(s) expression"),
        ("calculator", '{"expression": "1", "x": 2}', "error: bad arguments for calculator"),
    ]:
        result = await registry.call(name, args)
        assert result.is_error and result.content.startswith(message), (name, args, result.content)


async def test_config_file_tools_and_builtin_options(tmp_path, user_tools):
    config = tmp_path / "tools.toml"
    config.write_text('''
[builtins]
python = { timeout_s = 60, cpu_s = 1 }
http_fetch = { enabled = true, max_bytes = 1000 }

[[tools]]
name = "weather"
target = "my_tools:weather"
parameters = { type = "object", properties = { city = { type = "string" } }, required = ["city"] }

[[tools]]
name = "add"
target = "my_tools:add"

[[tools]]
name = "broken"
target = "my_tools:broken"
''')
    registry = load_registry(config)
    names = [s["function"]["name"] for s in registry.schemas()]
    assert names == ["calculator", "python", "http_fetch", "weather", "add", "broken"]
    weather = registry.schemas()[3]["function"]
    assert weather["description"] == "Current weather for a city." and weather["parameters"]["required"] == ["city"]
    assert (await registry.call("weather", '{"city": "Oslo"}')).content == "sunny in Oslo"
    assert json.loads((await registry.call("add", {"a": 2, "b": 3})).content) == {"sum": 5}
    extra = await registry.call("add", {"a": 2, "b": 3, "c": 4})
    assert extra.is_error and "unknown argument(s) c" in extra.content
    crashed = await registry.call("broken", {})
    assert crashed.is_error and crashed.content == "error: broken failed: RuntimeError: tool bug"
    # The config's python limits are the ones in force.
    slow = await registry.call("python", {"code": "while True: pass"})
    assert slow.content == "[killed: CPU limit of 1 s]"


def test_json_config_and_turning_builtins_off(tmp_path):
    config = tmp_path / "tools.json"
    config.write_text(json.dumps({"builtins": {"python": False, "calculator": {"enabled": False}}}))
    assert load_registry(config).schemas() == []


@pytest.mark.parametrize("text, message", [
    ('{"builtins": {"python": {"timeout": 3}}}', "unknown option"),
    ('{"builtins": {"shell": true}}', "unknown builtin"),
    ('{"tools": [{"name": "x", "target": "no_such_module_xyz:f"}]}', "cannot be loaded"),
    ('{"tools": [{"name": "x", "target": "json"}]}', "module:function"),
    ('{"tools": [{"name": "calculator", "target": "json:dumps"}]}', "registered twice"),
    ('{"tool": []}', "unknown key"),
    ("{", "cannot read"),
])
def test_bad_configs_are_config_errors(tmp_path, text, message):
    config = tmp_path / "tools.json"
    config.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_registry(config)


async def test_entry_point_tools(tmp_path, user_tools):
    dist = tmp_path / "my_tools_pkg-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: my-tools-pkg\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[specrelay.tools]\nweather = my_tools:weather\n")
    assert "weather" not in load_registry()
    registry = load_registry(use_entry_points=True)
    assert (await registry.call("weather", {"city": "Lima"})).content == "sunny in Lima"
