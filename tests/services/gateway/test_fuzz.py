"""Fuzzing both endpoints: whatever a client sends, the answer is never a 5xx and the server keeps serving.

Requests are drawn from the endpoints' own schema (`msgspec.json.schema` of the request Structs, turned into
hypothesis strategies below), so a new field is fuzzed the day it is added. Every value may be swapped for a
hostile one (deep nesting, integers past 64 bits, tiny and huge floats, lone surrogates, nulls, wrong types), unknown
fields are mixed in, and some bodies are not JSON at all. Why not schemathesis: it needs an OpenAPI document the
gateway does not serve, and a dependency tree of its own; what it would add over this (a schema-driven request
generator) is the forty lines of `from_schema`, and the hostile layer it lacks is ours either way.

Two passes: the gateway in this process in front of the fake verifier (deterministic, a few hundred examples), and a
short one against `specrelay serve` with the embedded model pair (real tokenization and sampling; slow).
"""

from __future__ import annotations

import json
import math
import urllib.request
from typing import Any

import aiohttp
import msgspec
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from specrelay.services.gateway.schemas import ChatCompletionRequest, CompletionRequest

from .conftest import MODEL, live_servers

ENDPOINTS = {"/v1/chat/completions": ChatCompletionRequest, "/v1/completions": CompletionRequest}
FAKE_TRIGGERS = ("FAIL", "SILENT")  # words the fake verifier answers with a scripted error or silence


class Deep:
    """A value nested `depth` levels deep, written into the body as text (json.dumps would recurse)."""

    def __init__(self, depth: int):
        self.depth = depth


def to_body(value: Any) -> bytes:
    """JSON with ASCII escapes, so a lone surrogate goes out as the escape `\\ud800` a client would send."""
    text = json.dumps(value, default=lambda d: f"\0deep{d.depth}\0")
    while (start := text.find('"\\u0000deep')) >= 0:
        end = text.index('\\u0000"', start + 1)
        depth = int(text[start + len('"\\u0000deep') : end])
        text = text[:start] + "[" * depth + "]" * depth + text[end + len('\\u0000"') :]
    return text.encode()


HOSTILE = st.one_of(
    st.none(),
    st.booleans(),
    st.sampled_from([0, -1, 1, 2**31, 2**63 - 1, 2**63, -(2**63) - 1, 2**64, 10**40, -(10**40)]),
    st.sampled_from([1e-45, 1e-40, 1e-38, 1e-6, -0.0, 0.5, 2.0000001, 1e308, -1e308, math.nan, math.inf]),
    st.sampled_from(["", "\ud800", "a\udfffb", "\udc00\ud800", "\x00", "🤖" * 4, "x" * 5000, MODEL]),
    st.builds(Deep, st.sampled_from([2, 64, 65, 900, 1_000, 20_000])),
    st.lists(st.integers(-3, 3), max_size=3),
    st.dictionaries(st.text(max_size=4), st.integers(), max_size=2),
)

TEXT = st.text(max_size=24).filter(lambda s: not any(w in s for w in FAKE_TRIGGERS))
JSON_LEAF = st.one_of(st.none(), st.booleans(), st.integers(-10, 10), st.floats(-2, 2), TEXT)
ANY_JSON = st.recursive(JSON_LEAF, lambda inner: st.one_of(
    st.lists(inner, max_size=3), st.dictionaries(TEXT, inner, max_size=3)), max_leaves=8)


TOKEN_IDS = st.lists(st.integers(3, 300), min_size=1, max_size=8)
# Values a client would plausibly send for fields whose schema allows far more than the server accepts: drawn
# four times in five, so that most requests get past validation to tokenization, admission and generation.
PLAUSIBLE = {
    "temperature": st.sampled_from([None, 0.0, 1e-40, 0.7, 1.0, 2.0]), "top_p": st.sampled_from([None, 0.5, 1.0]),
    "top_k": st.sampled_from([None, -1, 0, 1, 40]), "n": st.sampled_from([None, 1, 2]),
    "logprobs": st.sampled_from([None, False, True, 2]), "presence_penalty": st.sampled_from([None, 0.0]),
    "frequency_penalty": st.sampled_from([None, 0.0]), "slo_class": st.sampled_from([None, "batch", "deadline"]),
    "deadline_ms": st.sampled_from([None, 50.0, 1e9]), "echo": st.sampled_from([None, False]),
    "suffix": st.sampled_from([None, ""]), "logit_bias": st.sampled_from([None, {}, {"5": 2.5}]),
    "response_format": st.sampled_from([None, {"type": "text"}]),
    "stop": st.one_of(st.none(), TEXT.filter(bool), st.lists(TEXT.filter(bool), max_size=4)),
    "max_tokens": st.one_of(st.none(), st.integers(1, 40)), "max_completion_tokens": st.integers(1, 40),
    "prompt": st.one_of(TEXT.filter(str.strip), TOKEN_IDS, TOKEN_IDS.map(lambda ids: [ids])),
}


def sometimes_hostile(valid: st.SearchStrategy) -> st.SearchStrategy:
    """Mostly the valid value, one time in 25 a hostile one (a request has a dozen fields: most requests should
    still get past validation to what comes after it)."""
    return st.integers(0, 24).flatmap(lambda roll: HOSTILE if roll == 0 else valid)


def from_schema(node: dict, defs: dict, name: str = "") -> st.SearchStrategy:
    """A strategy for the JSON Schema subset that msgspec emits; `name` is the property the node describes."""
    if "$ref" in node:
        ref = node["$ref"].rsplit("/", 1)[-1]
        return st.deferred(lambda: from_schema(defs[ref], defs, name))
    if "anyOf" in node or "oneOf" in node:
        return st.one_of([from_schema(n, defs, name) for n in node.get("anyOf") or node["oneOf"]])
    if "enum" in node:
        return st.sampled_from(node["enum"])
    kind = node.get("type")
    if kind is None:  # Any
        return ANY_JSON
    if kind == "null":
        return st.none()
    if kind == "boolean":
        return st.booleans()
    if kind == "integer":
        low, high = node.get("minimum", -5), node.get("maximum", 300)
        return st.integers(low, min(high, max(low, 0) + 300)) | st.sampled_from([low, high])
    if kind == "number":
        return st.floats(-1, 3, allow_nan=False)
    if kind == "string":
        if name == "model":
            return st.sampled_from([MODEL, MODEL, MODEL, "gpt-4o"])
        if "pattern" in node:
            return st.from_regex(node["pattern"], fullmatch=True).filter(lambda s: "\n" not in s)
        return TEXT
    if kind == "array":
        return st.lists(from_schema(node.get("items", {}), defs), min_size=name == "messages", max_size=3)
    if kind == "object":
        if "properties" not in node:
            values = from_schema(node["additionalProperties"], defs) if "additionalProperties" in node else ANY_JSON
            return st.dictionaries(TEXT, values, max_size=3)
        required = set(node.get("required", ()))
        fields = {k: sometimes_hostile(st.one_of(*[PLAUSIBLE[k]] * 4, from_schema(v, defs, k)) if k in PLAUSIBLE
                                       else from_schema(v, defs, k)) for k, v in node["properties"].items()}
        unknown = st.dictionaries(st.text(max_size=8).filter(lambda k: k not in fields), HOSTILE, max_size=2)
        return st.fixed_dictionaries({k: v for k, v in fields.items() if k in required},
                                     optional={k: v for k, v in fields.items() if k not in required}).flatmap(
            lambda d: unknown.map(lambda extra: {**extra, **d}))
    raise AssertionError(f"a schema node the fuzzer does not know: {node}")


def request_strategy(path: str) -> st.SearchStrategy:
    schema = msgspec.json.schema(ENDPOINTS[path])
    return from_schema(schema, schema["$defs"])


BODIES = st.one_of(
    *[st.tuples(st.just(path), request_strategy(path).map(to_body)) for path in ENDPOINTS for _ in range(3)],
    st.tuples(st.sampled_from(list(ENDPOINTS)), st.binary(max_size=40)),  # not JSON at all
    st.tuples(st.sampled_from(list(ENDPOINTS)), request_strategy("/v1/completions").map(to_body).flatmap(
        lambda b: st.integers(0, len(b)).map(lambda n: b[:n]))),  # cut short
)
HEADERS = st.fixed_dictionaries({}, optional={
    "X-SLO-Class": st.sampled_from(["interactive", "batch", "vip", "", "DEADLINE"]),
    "X-Deadline-Ms": st.sampled_from(["250", "0", "-1", "soon", "1e400", "nan"])})

# The defects issue 18 found, always tried first.
KNOWN = [
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "temperature": 1e-40}),
    ("/v1/completions", {"model": MODEL, "prompt": "1, 2, 3,", "seed": 2**64, "max_tokens": 3}),
    ("/v1/completions", {"model": MODEL, "prompt": [[1, 2, 3]], "n": None, "stream": None, "max_tokens": 3}),
    ("/v1/chat/completions", {"model": MODEL, "messages": [], "x": Deep(5000)}),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "a\ud800"}], "top_k": 10**30,
                              "max_tokens": 3}),
]


async def assert_answered_well(session: aiohttp.ClientSession, url: str, path: str, body: bytes,
                               headers: dict[str, str]) -> None:
    async with session.post(url + path, data=body, headers={"Content-Type": "application/json", **headers}) as r:
        text = await r.text()
        assert r.status < 500, f"{r.status} for {body[:300]!r}: {text[:500]}"
        if r.status >= 400:
            error = json.loads(text)["error"]
            assert set(error) == {"message", "type", "param", "code"} and error["message"], text
        elif r.content_type == "text/event-stream":
            assert text.rstrip().endswith("data: [DONE]") and '"internal_error"' not in text, text[-500:]
        else:
            assert json.loads(text)["choices"], text


async def assert_serving(session: aiohttp.ClientSession, url: str, model: str = MODEL) -> None:
    body = {"model": model, "messages": [{"role": "user", "content": "Hello there"}], "max_tokens": 3}
    async with session.post(f"{url}/v1/chat/completions", json=body) as r:
        assert r.status == 200, await r.text()
        assert (await r.json())["choices"][0]["message"]["content"] is not None


def fuzz_settings(max_examples: int):
    return settings(max_examples=max_examples, derandomize=True, database=None, deadline=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                           HealthCheck.data_too_large, HealthCheck.filter_too_much])


def with_known(test):
    for path, body in KNOWN:
        test = example(request=(path, to_body(body)), headers={})(test)
    return test


@pytest.fixture
async def session():
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as s:
        yield s


@with_known
@fuzz_settings(max_examples=500)
@given(request=BODIES, headers=HEADERS)
async def test_fuzzed_requests_never_get_a_5xx(gateway, session, request, headers):
    path, body = request
    await assert_answered_well(session, gateway.url, path, body, headers)
    await assert_serving(session, gateway.url)


@pytest.fixture(scope="module")
def embedded_server(tmp_path_factory):
    """(the server, its model's name)"""
    server = live_servers.start_serve(tmp_path_factory.mktemp("fuzz-serve"))
    try:
        with urllib.request.urlopen(f"{server.url}/v1/models", timeout=30) as r:
            yield server, json.loads(r.read())["data"][0]["id"]
    finally:
        server.stop()


def for_embedded(request: tuple[str, bytes], model: str) -> tuple[str, bytes]:
    """The same request for the embedded pair: its model's name where the fake's was, and output capped at a few
    tokens where the request asks for more or leaves the limit out (CPU decoding is slow); a limit of the wrong type
    stays, to be refused."""
    path, body = request
    try:
        value = json.loads(body)
    except (ValueError, RecursionError):  # not JSON, or nested past the parser: sent as it is
        return request
    if not isinstance(value, dict):
        return request
    if value.get("model") == MODEL:
        value["model"] = model
    for key in ("max_tokens", "max_completion_tokens"):
        limit = value.get(key)
        if limit is None or (type(limit) is int and limit > 4):
            value[key] = 4
    return path, to_body(value)


@pytest.mark.slow
@with_known
@fuzz_settings(max_examples=60)
@given(request=BODIES, headers=HEADERS)
async def test_fuzzed_requests_against_the_embedded_pair(embedded_server, session, request, headers):
    server, model = embedded_server
    path, body = for_embedded(request, model)
    await assert_answered_well(session, server.url, path, body, headers)
    server.check_alive()
    await assert_serving(session, server.url, model)
