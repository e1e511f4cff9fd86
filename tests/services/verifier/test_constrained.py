"""Constrained decoding through the engine on the small trained pair, batched (issue 17's acceptance counts):
  * a forced tool call (named, "required", parallel_tool_calls false) always comes back as exactly the calls the
    parser reads, arguments valid for the function's schema (100 seeded sampled requests);
  * response_format json_schema always comes back as JSON valid for the schema (100 seeded sampled requests);
  * constrained greedy output with speculation (a draft-model tree) equals it without, token for token (50 prompts).
Every reply is checked with `jsonschema`, the way a client would check it."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest

from specrelay.services.drafter.draft_model import DraftModelProposer
from specrelay.services.toolcoord.parser import parse_tool_calls
from specrelay.services.verifier.engine import SpecEngine
from specrelay.shared.grammar import TOOL_MARKERS, json_grammar, tool_call_grammar
from specrelay.shared.grammar_mask import Constraints, GrammarCompiler
from specrelay.shared.modeling.loader import load_model
from specrelay.shared.modeling.runner import ModelRunner
from specrelay.shared.sampling import SamplingParams
from specrelay.shared.tokenizer import Tokenizer

MODELS = Path(__file__).resolve().parents[3] / "models"
CITY = {"type": "string", "maxLength": 24}
WEATHER = {"type": "object", "properties": {"city": CITY, "unit": {"enum": ["celsius", "fahrenheit"]}},
           "required": ["city", "unit"], "additionalProperties": False}
FLIGHT = {"type": "object", "properties": {"origin": CITY, "destination": CITY, "passengers": {
    "type": "integer", "minimum": 1, "maximum": 9}}, "required": ["origin", "destination", "passengers"], "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": WEATHER}},
         {"type": "function", "function": {"name": "book_flight", "parameters": FLIGHT}}]
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
ANSWER = {"type": "object", "properties": {"city": CITY, "temperature": {"type": "integer", "minimum": -50,
                                                                          "maximum": 60},
                                           "sunny": {"type": "boolean"}},
          "required": ["city", "temperature", "sunny"], "additionalProperties": False}
QUESTIONS = ["What's the weather in Paris?", "Book a flight from Oslo to Rome for two.", "Is it sunny in Lima?",
             "I need to fly to Tokyo tomorrow.", "How cold is it in Moscow?"]
MAX_TOKENS = 64


@pytest.fixture(scope="module")
def pair():
    tokenizer = Tokenizer(MODELS / "target")
    compiler = GrammarCompiler.from_dir(str(MODELS / "target"), 4096)
    return tokenizer, compiler, load_model(MODELS / "target"), load_model(MODELS / "draft")


def _engine(pair, speculate: bool) -> SpecEngine:
    tokenizer, compiler, target, draft = pair
    proposer = DraftModelProposer.chain(ModelRunner(draft, num_blocks=1024), length=3) if speculate else None
    engine = SpecEngine(ModelRunner(target, num_blocks=1024), proposer, max_nodes=4, adaptive=False)
    engine.constraints = Constraints(compiler)
    return engine


def _run(engine: SpecEngine, prompts: list[list[int]], params: list[SamplingParams]) -> list:
    requests = engine.add(prompts, params)
    while engine.running:
        engine.step()
    return requests


def _prompt(tokenizer: Tokenizer, question: str, forced: str = "") -> list[int]:
    """The question alone (no tools section: a short prompt keeps 200 requests cheap; the grammar, not the
    prompt, is what must hold the reply to the schema)."""
    return tokenizer.encode(tokenizer.render_chat([{"role": "user", "content": question}]) + forced)


def _text(tokenizer: Tokenizer, request) -> str:
    assert request.finish_reason == "stop", request.finish_reason  # complete, not cut at max_tokens
    return tokenizer.decode(request.output[:-1])


def _forced_call(i: int) -> tuple[str | None, bool, str]:
    """Request i's tool choice: "required" or a named function, parallel_tool_calls true or false."""
    name, parallel = [None, "get_weather", "book_flight"][i % 3], i % 2 == 0
    return name, parallel, '<tool_call>\n{"name": "' + (f'{name}", "arguments": ' if name else "")


@pytest.fixture(scope="module")
def sampled(pair):
    """100 seeded sampled forced tool calls and 100 seeded sampled json_schema replies, in one speculative batch."""
    tokenizer = pair[0]
    stop = (tokenizer.token_to_id("<|im_end|>"),)
    ids = {m: tokenizer.token_to_id(m) for m in TOOL_MARKERS}
    prompts, params = [], []
    for i in range(100):
        name, parallel, forced = _forced_call(i)
        prompts.append(_prompt(tokenizer, QUESTIONS[i % len(QUESTIONS)], forced))
        params.append(SamplingParams(temperature=1.0, seed=i, max_tokens=MAX_TOKENS, stop_token_ids=stop,
                                     grammar=tool_call_grammar("hermes", SCHEMAS, name, parallel, ids)))
    for i in range(100):
        prompts.append(_prompt(tokenizer, QUESTIONS[i % len(QUESTIONS)]))
        params.append(SamplingParams(temperature=1.0, seed=i, max_tokens=MAX_TOKENS, stop_token_ids=stop,
                                     grammar=json_grammar(ANSWER)))
    requests = _run(_engine(pair, speculate=True), prompts, params)
    return requests[:100], requests[100:]


def test_a_forced_tool_choice_always_yields_calls_with_schema_valid_arguments(pair, sampled):
    tokenizer = pair[0]
    for i, request in enumerate(sampled[0]):
        name, parallel, forced = _forced_call(i)
        parsed = parse_tool_calls(forced + _text(tokenizer, request), "hermes", set(SCHEMAS))
        assert parsed.tool_calls and not parsed.errors, forced + _text(tokenizer, request)
        assert parallel or len(parsed.tool_calls) == 1
        for call in parsed.tool_calls:
            assert name in (None, call.name)
            jsonschema.validate(json.loads(call.arguments), SCHEMAS[call.name])


def test_response_format_json_schema_always_yields_schema_valid_json(pair, sampled):
    for request in sampled[1]:
        jsonschema.validate(json.loads(_text(pair[0], request)), ANSWER)


def test_constrained_greedy_output_is_the_same_with_and_without_speculation(pair):
    tokenizer = pair[0]
    stop = (tokenizer.token_to_id("<|im_end|>"),)
    ids = {m: tokenizer.token_to_id(m) for m in TOOL_MARKERS}
    prompts, params = [], []
    for i in range(50):
        question = QUESTIONS[i % len(QUESTIONS)] + " " * (i // len(QUESTIONS))  # 50 distinct prompts
        name, parallel, forced = _forced_call(i)
        grammar = json_grammar(ANSWER) if i % 2 else tool_call_grammar("hermes", SCHEMAS, name, parallel, ids)
        prompts.append(_prompt(tokenizer, question, "" if i % 2 else forced))
        params.append(SamplingParams(max_tokens=MAX_TOKENS, stop_token_ids=stop, grammar=grammar))
    plain = _run(_engine(pair, speculate=False), prompts, params)
    speculative = _run(_engine(pair, speculate=True), prompts, params)
    assert [r.output for r in speculative] == [r.output for r in plain]
    assert all(r.finish_reason == "stop" for r in plain)
    assert sum(r.stats.accepted_tokens for r in speculative) > 0  # the draft did get tokens through
