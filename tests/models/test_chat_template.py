"""The chat template renders tools, tool calls and tool results identically through transformers and plain jinja2,
and the tokenizer keeps the chat and tool tokens whole."""

from __future__ import annotations

import json

import pytest

from specrelay.models.chat_template import SPECIAL_TOKENS, TOOL_TOKENS, render_chat
from specrelay.models.corpus import generate
from specrelay.models.tokenizer_train import save_tokenizer, train_tokenizer

WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city, e.g. <Lima> & 'Oslo'",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
CONVERSATIONS = [
    ([{"role": "user", "content": "hi"}], None),
    ([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"},
      {"role": "assistant", "content": "hello"}], None),
    ([{"role": "system", "content": "You are an agent."}, {"role": "user", "content": "Weather in Lima and Oslo?"},
      {"role": "assistant", "content": None, "tool_calls": [
          {"id": "a", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Lima"}'}},
          {"id": "b", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Oslo"}}}]},
      {"role": "tool", "tool_call_id": "a", "content": '{"temperature": 19}'},
      {"role": "tool", "tool_call_id": "b", "content": '{"temperature": 3}'},
      {"role": "assistant", "content": "Lima 19, Oslo 3."}], [WEATHER]),
    ([{"role": "user", "content": [{"type": "text", "text": "Weather "}, {"type": "text", "text": "in Lima?"}]},
      {"role": "assistant", "content": "Checking.", "tool_calls": [
          {"id": "a", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Lima"}}}]},
      {"role": "tool", "tool_call_id": "a", "content": "sunny"}], [WEATHER]),
]


@pytest.fixture(scope="module")
def hf_tokenizer(tmp_path_factory):
    from transformers import AutoTokenizer

    directory = tmp_path_factory.mktemp("tok")
    save_tokenizer(train_tokenizer((s.text for s in generate(0, "train", 120)), 600), directory)
    return AutoTokenizer.from_pretrained(directory)


@pytest.mark.parametrize("index", range(len(CONVERSATIONS)))
@pytest.mark.parametrize("generation_prompt", [False, True])
def test_transformers_and_jinja2_render_the_same_text(hf_tokenizer, index, generation_prompt):
    messages, tools = CONVERSATIONS[index]
    ours = render_chat(messages, tools, add_generation_prompt=generation_prompt)
    theirs = hf_tokenizer.apply_chat_template(messages, tools=tools, tokenize=False,
                                              add_generation_prompt=generation_prompt)
    assert ours == theirs


def test_tools_calls_and_results_render_in_the_qwen_format():
    messages, tools = CONVERSATIONS[2]
    text = render_chat(messages, tools, add_generation_prompt=False)
    assert text.startswith("<|im_start|>system\nYou are an agent.\n\n# Tools\n<tools>\n" + json.dumps(WEATHER)
                           + "\n</tools><|im_end|>\n<|im_start|>user\nWeather in Lima and Oslo?<|im_end|>\n")
    assert ("<|im_start|>assistant\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Lima\"}}\n"
            "</tool_call>\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Oslo\"}}\n"
            "</tool_call><|im_end|>\n") in text
    assert ("<|im_start|>user\n<tool_response>\n{\"temperature\": 19}\n</tool_response>\n<tool_response>\n"
            "{\"temperature\": 3}\n</tool_response><|im_end|>\n") in text
    assert text.endswith("<|im_start|>assistant\nLima 19, Oslo 3.<|im_end|>\n")
    # content before a call is separated from it by one newline
    assert "Checking.\n<tool_call>" in render_chat(*CONVERSATIONS[3])


def test_generation_prompt_opens_an_assistant_turn():
    assert render_chat([{"role": "user", "content": "hi"}], add_generation_prompt=True) == \
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_chat_and_tool_tokens_are_single_ids_and_tool_tags_survive_decoding(hf_tokenizer):
    for position, token in enumerate(SPECIAL_TOKENS + TOOL_TOKENS):
        assert hf_tokenizer(token, add_special_tokens=False)["input_ids"] == [position]
    text = render_chat(*CONVERSATIONS[2])
    ids = hf_tokenizer(text, add_special_tokens=False)["input_ids"]
    assert hf_tokenizer.decode(ids) == text
    visible = hf_tokenizer.decode(ids, skip_special_tokens=True)
    assert "<|im_start|>" not in visible and "<tool_call>" in visible and "</tool_response>" in visible
    assert hf_tokenizer.eos_token == "<|im_end|>" and hf_tokenizer.pad_token == "<|endoftext|>"
