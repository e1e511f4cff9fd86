"""`specrelay bench structured`: issue 17's acceptance checks of constrained decoding, on a real model, one process.

  * forced tool calls: `--num-calls` seeded requests at temperature 1 with speculation, tool_choice "required" or
    a named function, parallel_tool_calls allowed or not (a quarter each of the six combinations, in turn). A reply
    is valid when the gateway's parser (toolcoord/parser.py) reads at least one call and no malformed one, every
    call's arguments pass `jsonschema` for its function, a named choice calls only that function, and
    parallel_tool_calls false gives exactly one call. A call the text ends inside (max_tokens) is left out, as the
    gateway leaves it out (finish_reason "length"); the replies that had one are counted beside.
  * response_format json_schema: `--num-json` seeded requests at temperature 1 with speculation; valid when the
    reply is JSON that passes `jsonschema` (a reply cut by max_tokens is not).
  * constrained greedy output with speculation equal to it without, token for token, on `--num-greedy` prompts
    (forced calls and json_schema, alternately).

Why an in-process engine rather than a live serve: these checks are about the grammar under speculation, and the
engine is what a verifier runs (the same SpecEngine, Constraints and proposer, the drafter's masking included);
the gateway's share (the forced opening after the generation prompt, the parser) is reproduced here. A serve
adds HTTP and the bus, which cost minutes on a two-core machine and check nothing more here; the clients' tests
(tests/clients) drive those. The prompts are the question alone, without the tools section, as the earlier
figures were measured: it keeps 250 requests' prefill to seconds, and the grammar, not the prompt, is what holds a
reply to the schema. Each sampled set runs at every `--max-tokens`, in one batch.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

CITY = {"type": "string", "maxLength": 24}
WEATHER = {"type": "object", "properties": {"city": CITY, "unit": {"enum": ["celsius", "fahrenheit"]}},
           "required": ["city", "unit"], "additionalProperties": False}
FLIGHT = {"type": "object", "properties": {"origin": CITY, "destination": CITY, "passengers": {
    "type": "integer", "minimum": 1, "maximum": 9}}, "required": ["origin", "destination", "passengers"],
    "additionalProperties": False}
SCHEMAS = {"get_weather": WEATHER, "book_flight": FLIGHT}
ANSWER = {"type": "object", "properties": {"city": CITY, "temperature": {"type": "integer", "minimum": -50,
                                                                          "maximum": 60},
                                           "sunny": {"type": "boolean"}},
          "required": ["city", "temperature", "sunny"], "additionalProperties": False}
QUESTIONS = ["What's the weather in Paris?", "Book a flight from Oslo to Rome for two.", "Is it sunny in Lima?",
             "I need to fly to Tokyo tomorrow.", "How cold is it in Moscow?"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from specrelay.models.resolve import DEFAULT_MODEL

    parser.add_argument("--model", default=DEFAULT_MODEL, help=f"default: {DEFAULT_MODEL}")
    parser.add_argument("--draft", default=None, help="a draft model (default: the pair's draft for the pair's "
                        "target, else none)")
    parser.add_argument("--proposer", default=None, choices=("tree", "chain", "recycle", "suffix"),
                        help="default: serve's (tree with a draft model, else recycle)")
    parser.add_argument("--num-calls", type=int, default=100)
    parser.add_argument("--num-json", type=int, default=100)
    parser.add_argument("--num-greedy", type=int, default=50)
    parser.add_argument("--max-tokens", default="64,128", help="comma-separated: the sampled sets run at each "
                        "(64: the budget of the first figures; 128: the default here); greedy runs at the last")
    parser.add_argument("--max-nodes", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--json", default=None, metavar="FILE")


def forced_call(i: int) -> tuple[str | None, bool, str]:
    """Request i's tool choice ("required": None, or a function's name), whether parallel calls are allowed, and
    the opening the gateway appends to the prompt for it (hermes)."""
    name, parallel = [None, "get_weather", "book_flight"][i % 3], i % 2 == 0
    return name, parallel, '<tool_call>\n{"name": "' + (f'{name}", "arguments": ' if name else "")


class Workload:
    """Prompts and grammars on one model's tokenizer."""

    def __init__(self, model_dir: Path):
        from specrelay.shared.grammar import TOOL_MARKERS
        from specrelay.shared.tokenizer import Tokenizer

        self.tokenizer = Tokenizer(model_dir)
        tok = self.tokenizer
        self.stop = tuple(i for i in (tok.eos_token_id, tok.token_to_id("<|im_end|>"), tok.token_to_id(
            "<|endoftext|>")) if i is not None)
        self.markers = {m: i for m in TOOL_MARKERS if (i := tok.token_to_id(m)) is not None}

    def prompt(self, question: str, forced: str = "") -> list[int]:
        return self.tokenizer.encode(self.tokenizer.render_chat([{"role": "user", "content": question}]) + forced)

    def call(self, i: int, temperature: float, max_tokens: int, question: str | None = None):
        from specrelay.shared.grammar import tool_call_grammar
        from specrelay.shared.sampling import SamplingParams

        name, parallel, forced = forced_call(i)
        grammar = tool_call_grammar("hermes", SCHEMAS, name, parallel, self.markers)
        seed = i if temperature > 0 else None
        return self.prompt(question or QUESTIONS[i % len(QUESTIONS)], forced), SamplingParams(
            temperature=temperature, seed=seed, max_tokens=max_tokens, stop_token_ids=self.stop, grammar=grammar)

    def json(self, i: int, temperature: float, max_tokens: int, question: str | None = None):
        from specrelay.shared.grammar import json_grammar
        from specrelay.shared.sampling import SamplingParams

        seed = i if temperature > 0 else None
        return self.prompt(question or QUESTIONS[i % len(QUESTIONS)]), SamplingParams(
            temperature=temperature, seed=seed, max_tokens=max_tokens, stop_token_ids=self.stop,
            grammar=json_grammar(ANSWER))

    def text(self, request) -> str:
        output = request.output[:-1] if request.finish_reason == "stop" else request.output
        return self.tokenizer.decode(output)


def judge_call(workload: Workload, i: int, request) -> tuple[bool, bool, str]:
    """(valid, a call was cut by max_tokens and left out, why not valid) for forced-call request i."""
    import jsonschema

    from specrelay.services.toolcoord.parser import parse_tool_calls

    name, parallel, forced = forced_call(i)
    parsed = parse_tool_calls(forced + workload.text(request), "hermes", set(SCHEMAS))
    cut = parsed.cut is not None
    if not parsed.tool_calls:
        return False, cut, "no complete call" + (" (the first was cut by max_tokens)" if cut else "")
    if parsed.errors:
        return False, cut, f"a malformed call: {parsed.errors[0].message}"
    if not parallel and len(parsed.tool_calls) != 1:
        return False, cut, f"{len(parsed.tool_calls)} calls with parallel_tool_calls false"
    for call in parsed.tool_calls:
        if name not in (None, call.name):
            return False, cut, f"called {call.name}, not {name}"
        try:
            jsonschema.validate(json.loads(call.arguments), SCHEMAS[call.name])
        except jsonschema.ValidationError as e:
            return False, cut, f"arguments invalid: {e.message}"
    return True, cut, ""


def judge_json(workload: Workload, request) -> bool:
    import jsonschema

    try:
        jsonschema.validate(json.loads(workload.text(request)), ANSWER)
    except (ValueError, jsonschema.ValidationError):
        return False
    return request.finish_reason == "stop"


class Engines:
    """Fresh engines on one loaded model (each run starts with an empty cache and, for Token Recycling, an empty
    adjacency matrix: runs do not teach each other)."""

    def __init__(self, args: argparse.Namespace):
        from specrelay.models.resolve import choose_proposer, resolve_model
        from specrelay.shared.modeling.loader import load_model

        self.model_dir = resolve_model(args.model)
        self.proposer_name, draft_dir = choose_proposer(self.model_dir, args.draft, args.proposer)
        self.target = load_model(self.model_dir)
        self.draft = load_model(draft_dir) if draft_dir is not None else None
        self.max_nodes = args.max_nodes

    def run(self, prompts: list[list[int]], params: list, speculate: bool) -> tuple[list, float]:
        from specrelay.services.drafter.draft_model import DraftModelProposer
        from specrelay.services.drafter.recycling import TokenRecyclingProposer
        from specrelay.services.drafter.suffix import SuffixProposer
        from specrelay.services.verifier.engine import SpecEngine
        from specrelay.shared.grammar_mask import Constraints
        from specrelay.shared.modeling.runner import ModelRunner

        vocab = self.target.config.vocab_size
        blocks = sum(len(p) + sp.max_tokens + 2 * self.max_nodes for p, sp in zip(prompts, params)) // 16 + 64
        proposer = None
        if speculate:
            proposer = {"recycle": lambda: TokenRecyclingProposer(vocab), "suffix": lambda: SuffixProposer(vocab),
                        "chain": lambda: DraftModelProposer.chain(ModelRunner(self.draft, num_blocks=blocks)),
                        "tree": lambda: DraftModelProposer(ModelRunner(self.draft, num_blocks=blocks)),
                        }[self.proposer_name]()
        engine = SpecEngine(ModelRunner(self.target, num_blocks=blocks), proposer, max_nodes=self.max_nodes)
        engine.constraints = Constraints.for_model(str(self.model_dir), vocab)
        t0 = time.perf_counter()
        requests = engine.add(prompts, params)
        while engine.running:
            engine.step()
        return requests, time.perf_counter() - t0


def sampled(engines: Engines, workload: Workload, args, max_tokens: int) -> dict:
    """The forced calls and the json_schema replies at temperature 1, seeded, in one speculative batch."""
    calls = [workload.call(i, 1.0, max_tokens) for i in range(args.num_calls)]
    replies = [workload.json(i, 1.0, max_tokens) for i in range(args.num_json)]
    requests, wall_s = engines.run(*map(list, zip(*(calls + replies))), speculate=True)
    call_requests, json_requests = requests[: len(calls)], requests[len(calls):]
    judged = [judge_call(workload, i, r) for i, r in enumerate(call_requests)]
    by_parallel = {p: [v for i, (v, _, _) in enumerate(judged) if forced_call(i)[1] == p] for p in (True, False)}
    json_valid = [judge_json(workload, r) for r in json_requests]
    return {
        "max_tokens": max_tokens, "wall_s": round(wall_s, 1),
        "calls": {"valid": sum(v for v, _, _ in judged), "of": len(judged),
                  "valid_parallel_allowed": f"{sum(by_parallel[True])}/{len(by_parallel[True])}",
                  "valid_parallel_false": f"{sum(by_parallel[False])}/{len(by_parallel[False])}",
                  "ended_by_length": sum(r.finish_reason == "length" for r in call_requests),
                  "cut_call_left_out": sum(c for _, c, _ in judged),
                  "invalid": [{"request": i, "why": why, "finish_reason": r.finish_reason,
                               "tokens": len(r.output)} for i, ((v, _, why), r) in enumerate(zip(judged, call_requests))
                              if not v]},
        "json_schema": {"valid": sum(json_valid), "of": len(json_valid),
                        "ended_by_length": sum(r.finish_reason == "length" for r in json_requests)},
        "accepted_per_step": _per_step(requests),
    }


def greedy(engines: Engines, workload: Workload, num: int, max_tokens: int) -> dict:
    """Constrained greedy output with and without speculation on `num` distinct prompts."""
    jobs = []
    for i in range(num):
        question = QUESTIONS[i % len(QUESTIONS)] + " " * (i // len(QUESTIONS))  # distinct prompts
        jobs.append(workload.json(i, 0.0, max_tokens, question) if i % 2 else
                    workload.call(i, 0.0, max_tokens, question))
    prompts, params = map(list, zip(*jobs))
    plain, plain_s = engines.run(prompts, params, speculate=False)
    spec, spec_s = engines.run(prompts, params, speculate=True)
    return {"max_tokens": max_tokens, "equal": sum(a.output == b.output for a, b in zip(plain, spec)),
            "of": num, "ended_by_length": sum(r.finish_reason == "length" for r in plain),
            "plain_wall_s": round(plain_s, 1), "spec_wall_s": round(spec_s, 1),
            "accepted_per_step": _per_step(spec)}


def _per_step(requests) -> float:
    steps = sum(r.stats.steps for r in requests)
    return round(sum(r.stats.accepted_tokens for r in requests) / max(steps, 1), 2)


def main(args: argparse.Namespace) -> int:
    import os

    import torch

    from specrelay.bench.report import finish_report

    if args.threads:
        torch.set_num_threads(args.threads)
    budgets = [int(b) for b in args.max_tokens.split(",")]
    engines = Engines(args)
    workload = Workload(engines.model_dir)
    report = {"model": engines.model_dir.name, "proposer": engines.proposer_name,
              "load_average": [round(x, 2) for x in os.getloadavg()], "sampled": [], "goals": {}}
    print(f"{engines.model_dir.name}, speculation: {engines.proposer_name}, load average {report['load_average']}")
    for max_tokens in budgets:
        run = sampled(engines, workload, args, max_tokens)
        report["sampled"].append(run)
        c, j = run["calls"], run["json_schema"]
        print(f"max_tokens {max_tokens}: forced tool calls valid {c['valid']}/{c['of']} (parallel allowed "
              f"{c['valid_parallel_allowed']}, parallel_tool_calls false {c['valid_parallel_false']}; ended by "
              f"length {c['ended_by_length']}, a cut call left out {c['cut_call_left_out']}); json_schema valid "
              f"{j['valid']}/{j['of']} (ended by length {j['ended_by_length']}); accepted/step "
              f"{run['accepted_per_step']}; {run['wall_s']} s")
        for bad in c["invalid"]:
            print(f"  forced call {bad['request']} {forced_call(bad['request'])[:2]}: {bad['why']} "
                  f"({bad['finish_reason']}, {bad['tokens']} tokens)")
        report["goals"][f"forced_calls_valid_max_tokens_{max_tokens}"] = c["valid"] == c["of"]
        report["goals"][f"json_schema_valid_max_tokens_{max_tokens}"] = j["valid"] == j["of"]
    g = report["greedy"] = greedy(engines, workload, args.num_greedy, budgets[-1])
    print(f"constrained greedy, max_tokens {g['max_tokens']}: equal with/without speculation {g['equal']}/{g['of']} "
          f"(ended by length {g['ended_by_length']}); accepted/step {g['accepted_per_step']}; plain "
          f"{g['plain_wall_s']} s, speculative {g['spec_wall_s']} s")
    report["goals"]["greedy_equal_with_and_without_speculation"] = g["equal"] == g["of"]
    report["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
    finish_report(report, Path(args.json) if args.json else None)
    return 0 if all(report["goals"].values()) else 1
