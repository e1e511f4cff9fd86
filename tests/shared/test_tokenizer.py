"""Our tokenizer + chat template renderer against transformers' on the same directory."""

import json

import pytest

from specrelay.shared.errors import ModelLoadError
from specrelay.shared.tokenizer import TemplateError, Tokenizer

TEMPLATE = (
    "{%- if tools %}<|im_start|>system\n<tools>\n{% for t in tools %}{{ t | tojson }}\n{% endfor %}</tools><|im_end|>\n"
    "{% endif %}"
    "{%- for m in messages %}"
    "{%- if m.role not in ['system', 'user', 'assistant', 'tool'] %}{{ raise_exception('unknown role ' + m.role) }}"
    "{% endif %}"
    "<|im_start|>{{ m.role }}\n{{ m.content }}"
    "{%- for c in m.tool_calls or [] %}<tool_call>\n{{ c.function | tojson }}\n</tool_call>{% endfor %}"
    "<|im_end|>\n{% endfor %}"
    "{%- if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
MESSAGES = [
    {"role": "user", "content": "What's the weather in Paris & Lyon? <b>now</b>"},
    {"role": "assistant", "content": "", "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "weather", "arguments": "{\"city\": \"Paris\"}"}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": "18°C, sunny"},
]
TOOLS = [{"type": "function", "function": {"name": "weather", "description": "Weather in a city",
                                           "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                          "required": ["city"]}}}]


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<tool_call>", "</tool_call>"]
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=special,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    corpus = [json.dumps(TOOLS), "What's the weather in Paris? It is sunny, 18°C."] * 50
    tok.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    fast.chat_template = TEMPLATE
    path = tmp_path_factory.mktemp("tok")
    fast.save_pretrained(path)
    return path


def test_encode_decode_match_transformers(tokenizer_dir):
    from transformers import AutoTokenizer

    ours, theirs = Tokenizer(tokenizer_dir), AutoTokenizer.from_pretrained(tokenizer_dir)
    text = "<|im_start|>user\nWhat's the weather in Paris? 18°C<|im_end|>"
    assert ours.encode(text) == theirs.encode(text, add_special_tokens=False)
    assert ours.decode(ours.encode(text)) == text
    assert ours.eos_token_id == theirs.eos_token_id


def test_chat_template_renders_like_transformers(tokenizer_dir):
    from transformers import AutoTokenizer

    ours, theirs = Tokenizer(tokenizer_dir), AutoTokenizer.from_pretrained(tokenizer_dir)
    expected = theirs.apply_chat_template(MESSAGES, tools=TOOLS, add_generation_prompt=True, tokenize=False)
    assert ours.render_chat(MESSAGES, tools=TOOLS) == expected
    assert "Paris & Lyon? <b>now</b>" in expected  # tojson and content are not HTML-escaped
    ids = theirs.apply_chat_template(MESSAGES, tools=TOOLS, add_generation_prompt=True, tokenize=True)
    ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
    assert ours.apply_chat_template(MESSAGES, tools=TOOLS) == list(ids)


def test_template_errors_are_clear(tokenizer_dir):
    with pytest.raises(TemplateError, match="unknown role robot"):
        Tokenizer(tokenizer_dir).render_chat([{"role": "robot", "content": "hi"}])


def test_missing_tokenizer_file(tmp_path):
    with pytest.raises(ModelLoadError, match=r"tokenizer\.json: not found"):
        Tokenizer(tmp_path)
