"""Tool-response trimming: head and tail kept, a marker with the count of cut tokens, never over the limit."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from specrelay.services.toolcoord.trim import TrimConfig, trim_tool_response
from specrelay.shared.errors import ConfigError


class WordTokenizer:
    """One token per word or whitespace run: readable expectations."""

    def encode(self, text, add_special_tokens=True):
        import re
        return [self.vocab.setdefault(t, len(self.vocab)) for t in re.findall(r"\s+|[^\s]+", text)]

    def decode(self, ids):
        inverse = {v: k for k, v in self.vocab.items()}
        return "".join(inverse[i] for i in ids)

    def __init__(self):
        self.vocab: dict[str, int] = {}


class ByteTokenizer:
    """Byte-level, like GPT-2 BPE at its worst: a cut can split a UTF-8 character."""

    def encode(self, text):
        return list(text.encode())

    def decode(self, ids):
        return bytes(ids).decode(errors="replace")


def test_short_responses_pass_untouched():
    result = trim_tool_response("a small answer", WordTokenizer(), 100)
    assert result.text == "a small answer" and result.trimmed_tokens == 0 and result.kept_tokens == 5


def test_long_response_keeps_head_and_tail_with_a_counted_marker():
    tok = WordTokenizer()
    text = " ".join(f"w{i}" for i in range(1000))  # 1999 tokens
    result = trim_tool_response(text, tok, 100)
    assert result.original_tokens == 1999 and result.kept_tokens <= 100
    assert result.text.startswith("w0 w1 w2") and result.text.endswith("w998 w999")
    head, marker_and_tail = result.text.split("\n[... ", 1)
    count, tail = marker_and_tail.split(" tokens elided ...]\n")
    assert int(count) == result.trimmed_tokens
    # What was kept plus what was cut is the original.
    assert len(tok.encode(head)) + len(tok.encode(tail)) + result.trimmed_tokens == 1999


def test_head_fraction_shifts_what_is_kept():
    text = " ".join(f"w{i}" for i in range(1000))
    tail_only = trim_tool_response(text, WordTokenizer(), 64, head_fraction=0.0)
    assert tail_only.text.startswith("\n[... ") and tail_only.text.endswith("w999")


def test_a_cut_never_splits_a_character():
    text = "é" * 500 + "the end: 日本語"
    result = trim_tool_response(text, ByteTokenizer(), 101)
    assert "\ufffd" not in result.text
    assert result.kept_tokens <= 101 and result.text.endswith("日本語")


@settings(max_examples=100, deadline=None)
@given(st.text(min_size=0, max_size=600), st.integers(16, 300), st.floats(0, 1))
def test_never_over_the_limit(text, limit, head_fraction):
    tok = ByteTokenizer()
    result = trim_tool_response(text, tok, limit, head_fraction)
    assert len(tok.encode(result.text)) == result.kept_tokens <= limit
    if result.trimmed_tokens == 0:
        assert result.text == text


def test_config_limits_per_tool():
    config = TrimConfig(default_max_tokens=512, per_tool={"http_fetch": 128, "python": None})
    assert (config.limit_for("http_fetch"), config.limit_for("python"), config.limit_for("other")) == (128, None, 512)
    with pytest.raises(ConfigError):
        TrimConfig(default_max_tokens=4)
    with pytest.raises(ConfigError):
        TrimConfig(head_fraction=1.5)
