"""Incremental detokenization and stop strings: whatever the chunking, the text shown equals the whole decode cut
at the first stop string, and no part of a stop string is ever shown."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from specrelay.services.gateway.detok import IncrementalDetokenizer, StopMatcher, TextStream

TEXT = "Zürich: naïve crêpes 🤖🤖 — 12 robots said “merci”. Done!<|im_end|>"


def _chunks(items: list, cuts: list[int]) -> list[list]:
    bounds = sorted({0, len(items), *(c % (len(items) + 1) for c in cuts)})
    return [items[a:b] for a, b in zip(bounds, bounds[1:])]


def test_multibyte_characters_are_held_until_complete(tokenizer):
    ids = tokenizer.encode("🤖")
    assert len(ids) > 1, "the emoji must span several byte-level tokens for this test to mean anything"
    detok = IncrementalDetokenizer(tokenizer)
    shown = [detok.push([i]) for i in ids]
    assert shown[:-1] == [""] * (len(ids) - 1)  # never a U+FFFD on screen
    assert shown[-1] == "🤖"


@settings(max_examples=60, deadline=None)
@given(cuts=st.lists(st.integers(0, 200), max_size=12))
def test_any_chunking_gives_the_whole_decode(tokenizer, cuts):
    ids = tokenizer.encode(TEXT)
    detok = IncrementalDetokenizer(tokenizer)
    text = "".join(detok.push(chunk) for chunk in _chunks(ids, cuts)) + detok.flush()
    assert text == tokenizer.decode(ids, skip_special_tokens=True)
    assert "<|im_end|>" not in text


@settings(max_examples=80, deadline=None)
@given(cuts=st.lists(st.integers(0, 200), max_size=12),
       stops=st.sampled_from([["robots said"], ["🤖"], ["Done!", "crêpes"], ["“merci”."], ["not there"]]))
def test_stop_strings_cut_at_the_first_match_and_never_leak(tokenizer, cuts, stops):
    ids = tokenizer.encode(TEXT)
    whole = tokenizer.decode(ids, skip_special_tokens=True)
    hits = [whole.find(s) for s in stops if s in whole]
    expected = whole[:min(hits)] if hits else whole
    stream = TextStream(tokenizer, stops)
    pieces = []
    for chunk in _chunks(ids, cuts):
        result = stream.push(chunk)
        pieces.append(result.text)
        if result.stopped:
            break
    else:
        pieces.append(stream.finish().text)
    assert "".join(pieces) == expected
    assert stream.stopped == bool(hits)
    # what was shown at any moment is a prefix of the final text: nothing was shown and then taken back
    shown = ""
    for piece in pieces:
        shown += piece
        assert expected.startswith(shown)


def test_a_partial_stop_string_is_released_when_it_diverges():
    matcher = StopMatcher(["STOP"])
    assert matcher.push("abc ST").text == "abc "  # "ST" may become STOP
    assert matcher.push("O").text == ""
    assert matcher.push("RY").text == "STORY"  # it did not
    assert matcher.push(" end S").text == " end "
    assert matcher.flush() == "S"  # generation ended: the held "S" is ordinary text
    assert not matcher.stopped


def test_the_stop_string_completing_at_the_very_end_is_cut(tokenizer):
    stream = TextStream(tokenizer, ["thanks."])
    ids = tokenizer.encode("each one said thanks.")
    out = stream.push(ids)
    assert (out.text, out.stopped) == ("each one said ", True)
    assert stream.num_tokens == len(ids)
