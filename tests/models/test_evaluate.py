"""What counts as a valid tool call, and how the figures are printed."""

from __future__ import annotations

from specrelay.models.evaluate import format_table, tool_call_is_valid

TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}, "unit": {"type": "string"}}, "required": ["city"]}}}]


def test_a_call_naming_an_offered_tool_with_its_required_arguments_is_valid():
    assert tool_call_is_valid('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>', TOOLS)
    assert tool_call_is_valid('Sure.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo", '
                              '"unit": "celsius"}}\n</tool_call>', TOOLS)


def test_broken_json_unknown_tools_and_missing_arguments_are_invalid():
    assert not tool_call_is_valid("It is sunny in Oslo.", TOOLS)
    assert not tool_call_is_valid('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}\n</tool_call>',
                                  TOOLS)
    assert not tool_call_is_valid('<tool_call>\n{"name": "get_time", "arguments": {"city": "Oslo"}}\n</tool_call>',
                                  TOOLS)
    assert not tool_call_is_valid('<tool_call>\n{"name": "get_weather", "arguments": {"unit": "celsius"}}\n'
                                  '</tool_call>', TOOLS)
    assert not tool_call_is_valid('<tool_call>\n{"name": "get_weather", "arguments": "Oslo"}\n</tool_call>', TOOLS)
    assert not tool_call_is_valid('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}', TOOLS)


def test_the_table_lists_every_figure_with_its_goal():
    table = format_table({"target": {"val_loss": 1.5, "tool_call_valid_rate": 0.97},
                          "draft": {"val_loss": 2.25, "top1_agreement": 0.75}}).splitlines()
    assert table[0].split() == ["model", "metric", "value", "goal"]
    assert table[1].split() == ["target", "val_loss", "1.5000"]
    assert table[2].split() == ["target", "tool_call_valid_rate", "0.9700", ">=", "0.95"]
    assert table[4].split() == ["draft", "top1_agreement", "0.7500", ">=", "0.70"]
