"""A chat request's turns: the first generation, then one server-side tool round after another on the KV the
verifier already holds, until the model answers (or calls the client's tools).

    turn 1    Generate(hold_s) of the prompt; the server's tool schemas are rendered with the client's
    round k   the turn ended by its stop token and called only server-side tools (`split_calls`: a tool the request
              declares is the client's) -> run them, trimmed (toolcoord/server_tools.py) -> the continuation text
              from the chat template -> Continue(holder, its tokens): the verifier prefills only those
    end       the turn that answers, calls a client tool, writes a malformed call, or comes after `max_rounds`
              rounds; a KV still held is released (Cancel)

Fallback: a Continue answered with an error (the hold expired, the verifier restarted) or not answered at all within
`continue_timeout_s` (the holder is gone) becomes a fresh Generate of the whole rendered conversation,
`evicted_tokens` set so that usage.pte books the context as recomputed. Correct, only slower. The verifier books no
tool response tokens in a Generate's prompt, so the gateway adds that round's to usage.pte itself.

Tools run in this process (`ToolRegistry`, what `specrelay serve` does) or in `specrelay toolcoord` processes over
the bus (`RemoteTools`, `--remote-tools`); both answer `call(name, arguments) -> ToolResult` and never raise. The
schemas always come from the gateway's own registry (the same `--tools-config` file the toolcoord reads).

What the client sees: content of every turn (a later turn's after a newline), the final turn's client tool calls
(renumbered from 0), `tool_call_errors`, and, beyond OpenAI's schema, `server_tool_calls` on the message (each
call with its output and round) and `usage.tool_rounds` / `usage.tool_trimmed_tokens`. A server-side call never
shows up as a client `tool_calls` delta.
"""

from __future__ import annotations

import contextlib
import itertools
from dataclasses import dataclass
from typing import Any, AsyncIterator

import msgspec

from specrelay.services.gateway import responses as R
from specrelay.services.gateway.client_view import ClientView, within
from specrelay.services.gateway.exchange import Exchange, Prepared
from specrelay.services.gateway.generation import Generation
from specrelay.services.gateway.tools import ServerTools
from specrelay.services.toolcoord.parser import StreamingToolParser
from specrelay.services.toolcoord.server_tools import build_continuation, run_tool_calls, split_calls
from specrelay.services.toolcoord.trim import TrimConfig
from specrelay.shared.errors import ConfigError
from specrelay.shared.messages import CANCEL_STREAM, Cancel, Continue, Generate, TokenLogprob, Usage


@dataclass
class ChatPlan:
    """A chat request rendered and prepared (chat_plan.py: plan_chat): what `ChatTurns` runs, for chat completions
    and the Responses API alike."""

    exchange: Exchange  # the prepared request and its link to the verifier
    messages: list[dict[str, Any]]  # as the chat template sees them
    tools: list[dict[str, Any]] | None  # the client's and the server's, as the template shows them
    client_tools: set[str]
    forced: str  # the opening of a call a forced tool_choice appended to the prompt ("" if none)
    server: ServerTools | None
    max_calls: int | None = None  # parallel_tool_calls: false -> 1

    @property
    def prep(self) -> Prepared:
        return self.exchange.prep


class ChatTurns:
    """Runs the turns of one chat request. Iterate `deltas()` (the client's streamed deltas); afterwards `gen`
    is the last turn's generation and `message()` / `openai_usage()` shape the response."""

    def __init__(self, plan: ChatPlan, index: int = 0):
        """`index`: which of the request's `n` choices these turns generate."""
        self.plan, self.exchange = plan, plan.exchange.choice(index) if index else plan.exchange
        self.gen = self.exchange.generation()
        self.messages, self.tools, self.client_tools = plan.messages, plan.tools, plan.client_tools
        self.forced, self.server = plan.forced, plan.server
        self.fmt, self.max_model_len = self.exchange.config.tool_call_format, self.exchange.config.max_model_len
        self.tokenizer, self.metrics = self.exchange.tokenizer, self.exchange.metrics
        self.parser: StreamingToolParser | None = None
        self.contents: list[str] = []  # each turn's content
        self.server_calls: list[dict[str, Any]] = []
        self.rounds = 0
        self.trimmed_tokens = 0
        self._earlier_usage: Usage | None = None  # usage of a chain of turns a fallback replaced
        # Tool answers that reached the verifier inside a fresh Generate's prompt, which it books as plain prompt:
        # one round's per fallback (the answers of earlier rounds are in `_earlier_usage` already).
        self._fallback_tool_tokens = 0
        self._fallbacks = 0  # fresh Generates sent in place of a Continue: each goes under a new request id
        self._logprobs: list[TokenLogprob] = []  # of every turn's tokens, not yet taken

    @property
    def server_names(self) -> set[str]:
        return set(self.server.registry.tools) - self.client_tools if self.server else set()

    def _new_parser(self) -> StreamingToolParser | None:
        if not self.tools:
            return None
        return StreamingToolParser(self.fmt, [t["function"]["name"] for t in self.tools])

    async def deltas(self) -> AsyncIterator[dict[str, Any]]:
        """The turns' deltas as the client sees them (client_view.py)."""
        async with contextlib.aclosing(self._turns()) as turns:
            async for delta in turns:
                if delta := within(delta, self.plan.max_calls):
                    yield delta

    async def _turns(self) -> AsyncIterator[dict[str, Any]]:
        gen, first = self.gen, True
        context = len(gen.generate.prompt_token_ids)
        for round_no in itertools.count():
            parser, view, parts = self._new_parser(), ClientView(self.server_names), []
            content_before = any(self.contents)
            self.contents.append("")
            if parser is not None and first and self.forced and (d := view.delta(parser.feed(self.forced))):
                yield self._content(d, content_before)
            async for text in self.exchange.events(gen):
                self._logprobs += gen.take_logprobs()
                parts.append(text)
                d = view.delta(parser.feed(text)) if parser is not None else {"content": text}
                if d:
                    yield self._content(d, content_before)
            self._logprobs += gen.take_logprobs()
            if parser is not None and (d := view.delta(parser.finish())):
                yield self._content(d, content_before)
            finish = gen.finish
            if gen.resume is not None and finish.reason in ("error", "timeout") and gen.text.num_tokens == 0:
                # The hold had expired or its holder is gone: the whole conversation again; what the turns before
                # had held is evicted.
                self._earlier_usage = add_usage(self._earlier_usage, self.gen.finish.usage)
                resume, generate = gen.resume[1], gen.generate
                gen = self._fresh(generate, context - len(resume.token_ids), resume.tool_response_tokens,
                                  "continue_error" if finish.reason == "error" else "continue_timeout")
                self.contents.pop()
                continue
            self.gen, self.parser = gen, parser
            if parser is not None:
                self.metrics.tool_call_errors.inc(len(parser.result.errors))
            if parser is None or self.server is None:
                await self._release(gen, self._client_call_names())
                return
            server_calls, client_calls = split_calls(parser.result.tool_calls, self.server.registry,
                                                     self.client_tools)
            context += gen.text.num_tokens
            room = min(self.max_model_len - context - 1, gen.generate.sampling.max_tokens - gen.text.num_tokens)
            why_not = self._why_no_round(round_no, finish, parser, bool(client_calls), room)
            if not server_calls or why_not is not None:
                self.server_calls += [{**c.to_openai(), "round": round_no + 1, "output": None,
                                       "not_run": why_not} for c in server_calls]
                await self._release(gen, self._client_call_names())
                return
            generated = (self.forced if first else "") + "".join(parts)
            ran, cont_ids, tool_response_tokens = await self._run_round(server_calls, parser, generated)
            yield {"server_tool_calls": ran}
            context = context - 1 + len(cont_ids)  # the stop token is dropped, the continuation appended
            room = min(self.max_model_len - context - 1, room)
            gen = self._next(gen, cont_ids, tool_response_tokens, room, context)
            first = False

    def _why_no_round(self, round_no: int, finish, parser: StreamingToolParser, calls_client: bool,
                      room: int) -> str | None:
        """Why the server-side calls of this turn are not run (None: they are)."""
        return ("the turn also calls the client's tools" if calls_client else
                "the turn has malformed tool calls" if parser.result.errors else
                f"the request reached {self.server.max_rounds} tool rounds"
                if round_no >= self.server.max_rounds else
                "no tokens left for another turn" if room < 2 else
                "generation did not end at the model's end of turn"
                if finish.reason != "stop" or finish.stop_string else None)

    async def _run_round(self, calls: list, parser: StreamingToolParser,
                         generated: str) -> tuple[list[dict[str, Any]], list[int], int]:
        """Run one round's server-side calls and render the continuation: (the calls as the client sees them, the
        continuation's token ids, how many of them are tool answers)."""
        outcomes = await run_tool_calls(calls, self.server.runner, self.tokenizer, self.server.trim)
        cont = build_continuation(self.tokenizer.render_chat, self.messages, self.tools, generated, parser.result,
                                  outcomes)
        self.messages = cont.messages
        cont_ids = self.tokenizer.encode(cont.text)
        self.rounds += 1
        self.metrics.tool_rounds.inc()
        for o in outcomes:
            self.metrics.server_tool_calls.inc(tool=o.call.name, outcome="error" if o.result.is_error else "ok")
        self.trimmed_tokens += cont.trimmed_tokens
        ran = [{**o.call.to_openai(), "round": self.rounds, "output": o.content, "is_error": o.result.is_error}
               for o in outcomes]
        self.server_calls += ran
        return ran, cont_ids, cont.tool_response_tokens

    def _content(self, delta: dict[str, Any], content_before: bool) -> dict[str, Any]:
        """A later turn's content starts on a new line; the turn's content is kept for the message."""
        if "content" in delta:
            if content_before and not self.contents[-1]:
                delta = {**delta, "content": "\n" + delta["content"]}
            self.contents[-1] += delta["content"]
        return delta

    def _next(self, gen: Generation, cont_ids: list[int], tool_tokens: int, room: int, context: int) -> Generation:
        hold_s = self.server.hold_s if self.rounds < self.server.max_rounds else 0.0
        sampling = msgspec.structs.replace(gen.generate.sampling, max_tokens=max(room, 1))
        generate = msgspec.structs.replace(gen.generate, sampling=sampling, hold_s=hold_s, evicted_tokens=0)
        holder = gen.finish.holder
        if holder is None:  # the verifier did not hold this turn: the conversation goes again as a whole
            self._earlier_usage = add_usage(self._earlier_usage, gen.finish.usage)
            return self._fresh(generate, context - len(cont_ids), tool_tokens, "not_held")
        resume = Continue(generate.request_id, cont_ids, sampling, "", hold_s=hold_s,
                          tool_response_tokens=tool_tokens)
        return self.exchange.generation(generate, (holder, resume))

    def _fresh(self, generate: Generate, evicted: int, tool_tokens: int, why: str) -> Generation:
        """The round as a fresh Generate of the whole conversation (`tool_tokens`: the round's tool answers).

        It goes under a new request id: verifiers serve a request id once (a second copy of a Generate they have
        finished is a redelivery, not new work), and a holder still alive may yet read the Cancel of the old id."""
        self.metrics.tool_fallbacks.inc(reason=why)
        self._fallback_tool_tokens += tool_tokens
        self._fallbacks += 1
        prompt_ids = self.tokenizer.encode(self.tokenizer.render_chat(self.messages, tools=self.tools,
                                                                     add_generation_prompt=True))
        return self.exchange.generation(msgspec.structs.replace(
            generate, request_id=f"{generate.request_id}-f{self._fallbacks}", prompt_token_ids=prompt_ids,
            evicted_tokens=evicted))

    def _client_call_names(self) -> list[str]:
        """The client tools the last turn called (the turn ends with finish_reason "tool_calls" if any)."""
        if self.parser is None:
            return []
        return [c.name for c in self.parser.result.tool_calls if c.name not in self.server_names]

    @staticmethod
    async def _release(gen: Generation, client_tools: list[str]) -> None:
        """The last turn's KV is no longer needed for a Continue: release the hold now rather than when it ends.
        If the turn called client tools, their names go along: the verifier's retention policy then keeps,
        offloads or drops the KV for the conversation's next request (verifier/client_retention.py)."""
        if gen.finish is not None and gen.finish.holder is not None:
            await gen.bus.publish(CANCEL_STREAM, Cancel(gen.generate.request_id, tool_names=client_tools))

    # --- the response ------------------------------------------------------------------------------------------
    def message(self) -> dict[str, Any]:
        content = "".join(self.contents)
        if self.parser is None:
            return {"role": "assistant", "content": content}
        result = self.parser.result
        calls = [c for c in result.tool_calls if c.name not in self.server_names]
        message: dict[str, Any] = {"role": "assistant", "content": content or None}
        if calls:
            message["tool_calls"] = [c.to_openai() for c in calls]
        if result.errors:
            message["tool_call_errors"] = [e.to_dict() for e in result.errors]
        if self.server_calls:
            message["server_tool_calls"] = self.server_calls
        return within(message, self.plan.max_calls)

    def result(self) -> dict[str, Any]:  # a Choice's (streamer.py)
        return self.message()

    def take_logprobs(self) -> list[TokenLogprob]:
        """The logprobs of the tokens generated since the last call (every turn's, in order)."""
        taken, self._logprobs = self._logprobs, []
        return taken

    @property
    def has_client_calls(self) -> bool:
        return self.parser is not None and any(c.name not in self.server_names for c in self.parser.result.tool_calls)

    def usage(self) -> Usage | None:
        usage = add_usage(self._earlier_usage, self.gen.finish.usage if self.gen.finish is not None else None)
        if usage is None or usage.pte is None or not self._fallback_tool_tokens:
            return usage
        pte = msgspec.structs.replace(usage.pte,
                                      tool_response_tokens=usage.pte.tool_response_tokens + self._fallback_tool_tokens)
        return msgspec.structs.replace(usage, pte=pte)

    def openai_usage(self) -> dict[str, Any]:
        usage = R.usage_to_openai(self.usage(), len(self.plan.prep.generate.prompt_token_ids), self.gen.finish)
        if self.server is not None:  # beyond OpenAI's usage: what the server-side tool rounds did
            usage["tool_rounds"] = self.rounds
            usage["tool_trimmed_tokens"] = self.trimmed_tokens
        return usage


def add_usage(a: Usage | None, b: Usage | None) -> Usage | None:
    """Two chains of turns of one request (before and after a fallback), added up."""
    if a is None or b is None:
        return a or b
    ints = ("prompt_tokens", "completion_tokens", "cached_tokens", "spec_steps", "accepted_tokens", "drafted_tokens")
    out = msgspec.structs.replace(b, **{k: getattr(a, k) + getattr(b, k) for k in ints})
    if a.pte is not None and b.pte is not None:
        summed = ("total", "prefill", "decode", "recompute", "tool_response_tokens", "full_eviction_total", "turns")
        out.pte = msgspec.structs.replace(b.pte, **{k: getattr(a.pte, k) + getattr(b.pte, k) for k in summed})
    return out



# --- configuration (the gateway's and serve's command lines) --------------------------------------------------------

@dataclass(frozen=True)
class ToolOptions:
    config_file: str | None = None  # toolcoord's registry config (TOML/JSON); None: the built-ins
    enabled: bool = False
    remote: bool = False  # run calls in `specrelay toolcoord` processes over the bus
    max_rounds: int = 4
    hold_s: float = 30.0
    max_response_tokens: int = 2048  # each tool answer trimmed to this many tokens (head and tail kept)
    continue_timeout_s: float = 5.0

    def build(self, bus) -> ServerTools | None:
        """Loads the registry now, so a bad config file stops the server at start."""
        if not self.enabled:
            return None
        from specrelay.services.toolcoord.service import RemoteTools
        from specrelay.services.toolcoord.tools.registry import load_registry

        if self.max_response_tokens < 1:
            raise ConfigError(f"--tool-response-max-tokens {self.max_response_tokens}: must be >= 1")
        registry = load_registry(self.config_file)
        if not registry.tools:
            return None
        runner = RemoteTools(bus, timeout_s=self.hold_s) if self.remote else registry
        return ServerTools(registry, runner, TrimConfig(default_max_tokens=self.max_response_tokens),
                           self.max_rounds, self.hold_s, self.continue_timeout_s)


def add_tool_arguments(parser) -> None:
    import os

    group = parser.add_argument_group("server-side tools (run inside a request, on the KV it holds)")
    group.add_argument("--server-tools", action="store_true",
                       help="offer the model the server's tools on every chat request (off by default: the schemas "
                            "change every prompt, and a small model then calls tools where it should not)")
    group.add_argument("--tools-config", default=os.environ.get("SPECRELAY_TOOLS") or None, metavar="FILE",
                       help="tools registry, TOML or JSON (or SPECRELAY_TOOLS); implies --server-tools "
                            "(default registry: calculator and python)")
    group.add_argument("--remote-tools", action="store_true",
                       help="run tool calls in `specrelay toolcoord` processes over the bus (needs --redis)")
    group.add_argument("--max-tool-rounds", type=int, default=4, help="server-side tool rounds per request")
    group.add_argument("--tool-hold-s", type=float, default=30.0,
                       help="how long the verifier keeps a turn's KV while its tools run")
    group.add_argument("--tool-continue-timeout-s", type=float, default=5.0,
                       help="a round's Continue unanswered this long (the verifier holding the KV is gone): send "
                            "the whole conversation as a fresh request instead")
    group.add_argument("--tool-response-max-tokens", type=int, default=2048,
                       help="longest tool answer appended (head and tail kept, the middle elided)")


def tool_options(args) -> ToolOptions:
    if args.remote_tools and not args.redis:
        raise ConfigError("--remote-tools needs --redis: the toolcoord processes take calls from the bus")
    return ToolOptions(args.tools_config, args.server_tools or args.tools_config is not None, args.remote_tools,
                       args.max_tool_rounds, args.tool_hold_s, args.tool_response_max_tokens,
                       args.tool_continue_timeout_s)
