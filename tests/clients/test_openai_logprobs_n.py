"""logprobs, logit_bias and n through the `openai` SDK against a live `specrelay serve` on the small pair: OpenAI's
shapes parsed into the SDK's types, streamed and whole, and the hostile values as 400s that leave the server
serving."""

from __future__ import annotations

import openai
import pytest

from specrelay.shared.tokenizer import Tokenizer

from .conftest import PAIR_TARGET

GREEDY = {"temperature": 0.0}
HI = [{"role": "user", "content": "Tell me about the sea."}]


@pytest.fixture
def client(server_url):
    with openai.OpenAI(base_url=f"{server_url}/v1", api_key="unused", max_retries=0, timeout=60) as c:
        yield c


def test_chat_logprobs_whole_and_streamed(client, model_name):
    reply = client.chat.completions.create(model=model_name, messages=HI, max_tokens=12, logprobs=True,
                                           top_logprobs=3, **GREEDY)
    [choice] = reply.choices
    content = choice.logprobs.content
    assert len(content) == reply.usage.completion_tokens == 12
    for entry in content:
        assert entry.logprob <= 0 and bytes(entry.bytes) == entry.token.encode()
        assert len(entry.top_logprobs) == 3
        # greedy: the chosen token is the most likely one of the processed distribution
        assert entry.top_logprobs[0].token == entry.token
        assert entry.top_logprobs[0].logprob == pytest.approx(entry.logprob, abs=1e-4)
        assert [t.logprob for t in entry.top_logprobs] == sorted((t.logprob for t in entry.top_logprobs), reverse=True)
    assert "".join(e.token for e in content) == choice.message.content
    chunks = list(client.chat.completions.create(model=model_name, messages=HI, max_tokens=12, logprobs=True,
                                                 top_logprobs=3, stream=True, **GREEDY))
    streamed = [e for c in chunks for ch in c.choices if ch.logprobs and ch.logprobs.content
                for e in ch.logprobs.content]
    assert [e.token for e in streamed] == [e.token for e in content]
    assert [e.logprob for e in streamed] == pytest.approx([e.logprob for e in content], abs=1e-4)


def test_completion_logprobs_whole_and_streamed(client, model_name):
    reply = client.completions.create(model=model_name, prompt="The sea is", max_tokens=8, logprobs=2, **GREEDY)
    [choice] = reply.choices
    lp = choice.logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 8
    assert "".join(lp.tokens) == choice.text
    for token, logprob, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert token in top and len(top) <= 3 and max(top.values()) == pytest.approx(logprob, abs=1e-4)
    chunks = list(client.completions.create(model=model_name, prompt="The sea is", max_tokens=8, logprobs=2,
                                            stream=True, **GREEDY))
    assert sum((c.choices[0].logprobs.tokens for c in chunks if c.choices and c.choices[0].logprobs), []) == lp.tokens


def test_logit_bias_steers_the_target_and_the_draft(client, model_name):
    tokenizer = Tokenizer(PAIR_TARGET)
    sea = tokenizer.encode(" sea")[0]
    forced = client.completions.create(model=model_name, prompt="The sky is", max_tokens=6, logprobs=0, **GREEDY,
                                       logit_bias={str(sea): 100})
    # +100 makes it the argmax at every step
    assert forced.choices[0].logprobs.tokens == [tokenizer.decode([sea])] * 6
    plain = client.completions.create(model=model_name, prompt="The sea is", max_tokens=6, logprobs=0, **GREEDY)
    first = plain.choices[0].logprobs.tokens[0]
    ids = [i for i in range(tokenizer.vocab_size) if tokenizer.decode([i]) == first]
    banned = client.completions.create(model=model_name, prompt="The sea is", max_tokens=6, logprobs=0, **GREEDY,
                                       logit_bias={str(i): -100 for i in ids})
    assert banned.choices[0].logprobs.tokens[0] != first


@pytest.mark.parametrize("stream", [False, True])
def test_n_choices_chat_and_completions(client, model_name, stream):
    args = {"model": model_name, "max_tokens": 6, "n": 3, "temperature": 1.0, "seed": 11}
    if not stream:
        chat = client.chat.completions.create(messages=HI, logprobs=True, **args)
        assert [c.index for c in chat.choices] == [0, 1, 2]
        assert chat.usage.completion_tokens == sum(len(c.logprobs.content) for c in chat.choices)
        again = client.chat.completions.create(messages=HI, logprobs=True, **args)
        assert [c.message.content for c in again.choices] == [c.message.content for c in chat.choices]
        text = client.completions.create(prompt="The sea is", logprobs=0, **args)
        assert [c.index for c in text.choices] == [0, 1, 2]
        assert text.usage.completion_tokens == sum(len(c.logprobs.tokens) for c in text.choices)
        one = client.completions.create(prompt="The sea is", **args | {"n": 1})
        assert text.usage.prompt_tokens == one.usage.prompt_tokens  # the prompt once, as OpenAI counts it
        return
    chunks = list(client.chat.completions.create(messages=HI, stream=True, stream_options={"include_usage": True},
                                                 **args))
    texts = {i: "".join(ch.delta.content or "" for c in chunks for ch in c.choices if ch.index == i)
             for i in range(3)}
    finishes = [ch.finish_reason for c in chunks for ch in c.choices if ch.finish_reason]
    assert len(finishes) == 3 and all(texts.values())
    whole = client.chat.completions.create(messages=HI, **args)
    assert [texts[i] for i in range(3)] == [c.message.content for c in whole.choices]  # seeded: the same draws
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


@pytest.mark.parametrize("extra,param", [
    ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ({"top_logprobs": 2}, "top_logprobs"),
    ({"n": 0}, "n"),
    ({"n": 1000}, "n"),
    ({"logit_bias": {"abc": 1}}, "logit_bias"),
    ({"logit_bias": {"5": 1e9}}, "logit_bias"),
])
def test_hostile_values_are_400s_and_the_server_keeps_serving(client, model_name, extra, param):
    with pytest.raises(openai.BadRequestError) as error:
        client.chat.completions.create(model=model_name, messages=HI, max_tokens=2, **extra)
    assert error.value.param == param
    reply = client.chat.completions.create(model=model_name, messages=HI, max_tokens=2, **GREEDY)
    assert reply.choices[0].finish_reason in ("stop", "length")


def test_n_choices_prefill_the_prompt_once(client, model_name):
    """The n Generates carry one prompt: the verifier prefills it once and copies its KV to the other choices
    (services/verifier/engine_fork.py), whether they reach it in one step or a step apart (then each copies all
    but the last prompt token and prefills that one)."""
    text = " ".join(f"Point {i}: the tide at pier {i * 7} turns after {i + 3} hours." for i in range(9))
    messages = [{"role": "user", "content": f"Summarise these notes (n sharing check). {text}"}]
    reply = client.chat.completions.create(model=model_name, messages=messages, max_tokens=4, n=3, **GREEDY)
    usage = reply.usage.model_dump()
    fresh = usage["prompt_tokens"] - usage["prompt_tokens_details"]["cached_tokens"]
    assert fresh > 100  # a new prompt: the prefix cache had at most the template's start
    assert fresh <= usage["pte"]["prefill"] <= fresh + 2  # once, not 3 times (at most 1 more for each late choice)
