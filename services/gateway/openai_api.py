"""The OpenAI-compatible handlers: /v1/chat/completions, /v1/completions, /v1/models, /health, /metrics.

Every handler reads top to bottom: validate -> tokenize -> admit -> generate -> shape the response. Refusals are
`ApiError`s rendered by the error middleware; a generation that fails after a stream has started ends the stream
with an error event instead (the status line is already sent).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from dataclasses import dataclass
from typing import Any, AsyncIterator

import msgspec
from aiohttp import web

from specrelay.services.gateway import responses as R
from specrelay.services.gateway.admission import AdmissionFull, Ticket
from specrelay.services.gateway.errors import ApiError, bad_request
from specrelay.services.gateway.generation import Finish, Generation, Timeouts, Timing
from specrelay.services.gateway.metrics import CONTENT_TYPE, InterTokenLatency
from specrelay.services.gateway.schemas import (
    ChatCompletionRequest,
    CompletionRequest,
    NamedToolChoice,
    Sampling,
    check_chat,
    check_completion,
    completion_prompt,
    decode,
    header_extensions,
    messages_for_template,
    stop_strings,
    tools_for_template,
    top_k,
)
from specrelay.services.gateway.sse import SseWriter, client_gone, drain, stream
from specrelay.services.gateway.state import GATEWAY, Gateway
from specrelay.services.gateway.structured import chat_grammar, response_format_grammar
from specrelay.services.gateway.tool_rounds import CLIENT_TOOL_HOLD_S, ChatTurns, ServerTools
from specrelay.shared.messages import Continue, Generate, SamplingSpec
from specrelay.shared.tokenizer import TemplateError

CLIENT_CLOSED = 499  # nginx's "client closed request": only ever seen in logs and metrics
LONG_PROMPT_CHARS = 16_384
PROMPT_PARAM = {"chatcmpl": "messages", "cmpl": "prompt", "resp": "input"}  # by id prefix: the field a 400 names


@dataclass
class Prepared:
    """A validated request, ready to admit and send to the verifier."""

    request_id: str
    created: int
    generate: Generate
    stops: list[str]
    ticket: Ticket
    timing: Timing
    include_usage: bool


def _prepare(gw: Gateway, request: web.Request, req: Sampling, prompt_ids: list[int], max_tokens: int | None,
             id_prefix: str, timing: Timing, grammar: str | None = None) -> Prepared:
    cfg = gw.config
    if not prompt_ids:
        raise bad_request("the prompt is empty after tokenization", param="messages", code="invalid_value")
    room = cfg.max_model_len - len(prompt_ids)
    if room < 1 or (max_tokens is not None and max_tokens > room):
        asked = f" and {max_tokens} output tokens were asked for" if max_tokens is not None else ""
        raise bad_request(f"this model's maximum context length is {cfg.max_model_len} tokens; the prompt has "
                          f"{len(prompt_ids)} tokens{asked}", param=PROMPT_PARAM[id_prefix],
                          code="context_length_exceeded")
    slo_class, deadline_ms = header_extensions(request.headers, req)
    arrival_ms = time.time() * 1000.0
    request_id = f"{id_prefix}-{uuid.uuid4().hex}"
    limit = max_tokens if max_tokens is not None else room
    sampling = SamplingSpec(
        temperature=cfg.default_temperature if req.temperature is None else req.temperature,
        top_p=cfg.default_top_p if req.top_p is None else req.top_p, top_k=top_k(req), seed=req.seed, max_tokens=limit,
        stop_token_ids=[] if req.ignore_eos else list(gw.stop_token_ids), grammar=grammar)
    generate = Generate(request_id=request_id, prompt_token_ids=prompt_ids, sampling=sampling, reply_to="",
                        model=cfg.model_name, slo_class=slo_class or "interactive",
                        deadline_ms=None if deadline_ms is None else arrival_ms + deadline_ms, arrival_ms=arrival_ms)
    ticket = Ticket(request_id, generate.slo_class, timing.arrival_s,
                    None if deadline_ms is None else timing.arrival_s + deadline_ms / 1000, len(prompt_ids), limit)
    include_usage = bool(req.stream_options and req.stream_options.include_usage)
    return Prepared(request_id, R.now_s(), generate, stop_strings(req), ticket, timing, include_usage)


async def _encode(gw: Gateway, text: str, add_special_tokens: bool = False) -> list[int]:
    # A long prompt takes milliseconds to tokenize; off the event loop it does not stall every other stream
    # (the tokenizers library releases the GIL).
    if len(text) < LONG_PROMPT_CHARS:
        return gw.tokenizer.encode(text, add_special_tokens)
    return await asyncio.to_thread(gw.tokenizer.encode, text, add_special_tokens)


def check_model(gw: Gateway, model: str) -> None:
    if model != gw.config.model_name:
        raise ApiError(400, f"the model {model!r} does not exist; this server serves {gw.config.model_name!r}",
                       param="model", code="model_not_found")


@contextlib.asynccontextmanager
async def admitted(gw: Gateway, ticket: Ticket):
    gw.metrics.set_load(gw.admission.num_running, gw.admission.num_waiting + 1)
    try:
        await gw.admission.admit(ticket)
    except AdmissionFull as e:
        gw.metrics.rejected.inc()
        raise ApiError(503, f"the server is at capacity ({e}); retry later", code="server_overloaded",
                       headers={"Retry-After": "1"}) from None
    finally:
        gw.metrics.set_load(gw.admission.num_running, gw.admission.num_waiting)
    try:
        yield
    finally:
        gw.admission.release(ticket)
        gw.metrics.set_load(gw.admission.num_running, gw.admission.num_waiting)


def _generation(gw: Gateway, request: web.Request, prep: Prepared, generate: Generate | None = None,
                resume: tuple[str, Continue] | None = None) -> Generation:
    """A generation of the request (`generate`: a later turn's; `resume`: go on with a held turn's KV)."""
    continue_s = gw.server_tools.continue_timeout_s if gw.server_tools is not None else None
    timeouts = Timeouts(gw.config.chunk_timeout_s, gw.config.cancel_grace_s, continue_s)
    return Generation(gw.bus, gw.tokenizer, generate or prep.generate, prep.stops, lambda: client_gone(request),
                      timeouts, prep.timing, resume=resume)


def observe(gw: Gateway, gen: Generation, reason: str, usage: dict[str, Any]) -> None:
    m, v, t = gw.metrics, gw.metrics.vllm, gen.timing
    m.finished.inc(reason=reason)
    v.finished(reason)
    if t.first_token_s is not None:
        for ours, theirs, seconds in ((m.ttft, v.ttft, t.first_token_s - t.arrival_s),
                                      (m.e2e, v.e2e, t.last_token_s - t.arrival_s)):
            ours.observe(seconds)
            theirs.observe(seconds)
        if usage["completion_tokens"] > 1:
            tpot_s = (t.last_token_s - t.first_token_s) / (usage["completion_tokens"] - 1)
            m.tpot.observe(tpot_s)
            v.tpot.observe(tpot_s)
    prompt, completion = usage["prompt_tokens"], usage["completion_tokens"]
    cached = usage["prompt_tokens_details"]["cached_tokens"]
    for counter, amount in ((m.prompt_tokens, prompt), (v.prompt_tokens, prompt), (v.prefix_queries, prompt),
                            (m.completion_tokens, completion), (v.generation_tokens, completion),
                            (m.cached_tokens, cached), (v.prefix_hits, cached)):
        counter.inc(amount)
    v.request_prompt_tokens.observe(prompt)
    v.request_generation_tokens.observe(completion)
    for counters, key in (((m.spec_steps, v.spec_drafts), "spec_steps"),
                          ((m.drafted, v.spec_draft_tokens), "drafted_tokens"),
                          ((m.accepted, v.spec_accepted_tokens), "accepted_tokens")):
        if isinstance(usage.get(key), (int, float)):
            for counter in counters:
                counter.inc(usage[key])
    relay = usage.get("relay") or {}
    for counter, key in ((m.relay_span, "span_tokens"), (m.relay_reused, "reused_tokens"),
                         (m.relay_recomputed, "recomputed_tokens")):
        counter.inc(relay.get(key, 0))
    pte = usage.get("pte") or {}
    for part in ("total", "prefill", "decode", "recompute"):
        if part in pte:
            m.pte.inc(pte[part], part=part)


async def _events(gw: Gateway, request_id: str, gen: Generation) -> AsyncIterator[str]:
    """`gen`'s text deltas, with the tokens behind them reported to the scheduler as they arrive: the SLO policy
    learns time per token and output lengths from them. `request_id`: the admission ticket's (a tool round's
    fallback may run under another id at the verifier)."""
    completed = False
    itl = InterTokenLatency(gw.metrics.vllm.itl)
    try:
        async with contextlib.aclosing(gen.events()) as events:
            async for text in events:
                gw.admission.progress(request_id, gen.text.num_tokens)
                itl.arrived(gen.text.num_tokens)
                yield text
        completed = gen.finish is not None and gen.finish.reason in ("stop", "length")
    finally:
        gw.admission.finished(request_id, gen.text.num_tokens, completed)


def observe_failure(gw: Gateway, finish: Finish | None, reason: str) -> None:
    gw.metrics.finished.inc(reason=finish.reason if finish is not None else reason)
    gw.metrics.vllm.finished("abort")


# --- chat --------------------------------------------------------------------------------------------------------

def _forced_prefix(fmt: str, choice: Any) -> str:
    """Text appended after the generation prompt so the model must call a tool: the opening of a call in the
    model's own format (the verifier continues from it; the parser reads it as the start of the reply)."""
    if isinstance(choice, NamedToolChoice):
        name = choice.function.name
        return (f'{{"name": "{name}", "parameters": ' if fmt == "llama3" else
                f'<tool_call>\n{{"name": "{name}", "arguments": ')
    if choice == "required":
        return '{"name": "' if fmt == "llama3" else '<tool_call>\n{"name": "'
    return ""


@dataclass
class ChatPlan:
    """A chat request rendered and prepared: what `chat_turns` runs (chat completions and the Responses API)."""

    prep: Prepared
    messages: list[dict[str, Any]]
    tools: list[dict[str, Any]] | None  # the client's and the server's, as the template shows them
    client_tools: set[str]
    forced: str
    server: ServerTools | None
    max_calls: int | None = None  # parallel_tool_calls: false -> 1


async def plan_chat(gw: Gateway, request: web.Request, req: ChatCompletionRequest, max_tokens: int | None,
                    timing: Timing, id_prefix: str = "chatcmpl") -> ChatPlan:
    """Render and tokenize a checked chat request (`check_chat`, `check_model`), ready to admit."""
    client_tools = tools_for_template(req)
    server = gw.server_tools if req.tool_choice != "none" else None  # "none": no tool of either side
    tools = server.template_tools(client_tools) if server is not None else client_tools
    forced = _forced_prefix(gw.config.tool_call_format, req.tool_choice) if client_tools else ""
    grammar = chat_grammar(req, client_tools, gw.config.tool_call_format, gw.tokenizer.token_to_id)
    messages = messages_for_template(req)
    try:
        prompt_text = gw.tokenizer.render_chat(messages, tools) + forced
    except TemplateError as e:
        raise bad_request(str(e), param=PROMPT_PARAM[id_prefix], code="invalid_value") from None
    prep = _prepare(gw, request, req, await _encode(gw, prompt_text), max_tokens, id_prefix, timing, grammar)
    if server is not None and server.max_rounds > 0:  # keep the turn's KV for a tool round (tool_rounds.py)
        prep.generate = msgspec.structs.replace(prep.generate, hold_s=server.hold_s)
    elif client_tools:  # until the turn is parsed: a client tool pause hands the KV to the retention policy
        prep.generate = msgspec.structs.replace(prep.generate, hold_s=CLIENT_TOOL_HOLD_S)
    return ChatPlan(prep, messages, tools, {t["function"]["name"] for t in client_tools or []}, forced, server,
                    1 if req.parallel_tool_calls is False else None)


async def client_deltas(plan: ChatPlan, turns: ChatTurns) -> AsyncIterator[dict[str, Any]]:
    """`turns.deltas()` as the client sees them: with `parallel_tool_calls: false`, calls past the first are
    dropped (a forced tool_choice's grammar writes one; with tool_choice auto the model may write several)."""
    async with contextlib.aclosing(turns.deltas()) as deltas:
        async for delta in deltas:
            if plan.max_calls is not None:
                delta = _within(delta, plan.max_calls)
            if delta:
                yield delta


def client_message(plan: ChatPlan, message: dict[str, Any]) -> dict[str, Any]:
    """`turns.message()` as the client sees it (see `client_deltas`)."""
    return _within(message, plan.max_calls) if plan.max_calls is not None else message


def _within(delta: dict[str, Any], max_calls: int) -> dict[str, Any]:
    out = dict(delta)
    if "tool_calls" in out:
        calls = [c for i, c in enumerate(out.pop("tool_calls")) if c.get("index", i) < max_calls]
        if calls:
            out["tool_calls"] = calls
    if "tool_call_errors" in out:  # an error about a dropped call names no call the client has
        out["tool_call_errors"] = [{k: v for k, v in e.items() if k != "index" or v < max_calls}
                                   for e in out["tool_call_errors"]]
    return out


def chat_turns(gw: Gateway, request: web.Request, plan: ChatPlan) -> ChatTurns:
    """The turns of an admitted chat request (iterate `deltas()`)."""
    prep = plan.prep
    return ChatTurns(first=_generation(gw, request, prep),
                     make_generation=lambda generate, resume: _generation(gw, request, prep, generate, resume),
                     events=lambda gen: _events(gw, prep.request_id, gen), encode=gw.tokenizer.encode,
                     render=gw.tokenizer.render_chat, messages=plan.messages, tools=plan.tools,
                     client_tools=plan.client_tools, fmt=gw.config.tool_call_format, forced=plan.forced,
                     server=plan.server, max_model_len=gw.config.max_model_len, tokenizer=gw.tokenizer,
                     metrics=gw.metrics)


async def chat_completions(request: web.Request) -> web.StreamResponse:
    gw = request.app[GATEWAY]
    timing = Timing()
    req = decode(await request.read(), ChatCompletionRequest)
    max_tokens = check_chat(req)
    check_model(gw, req.model)
    plan = await plan_chat(gw, request, req, max_tokens, timing)
    async with admitted(gw, plan.prep.ticket):
        turns = chat_turns(gw, request, plan)
        if req.stream:
            return await _stream_chat(gw, request, req.model, plan, turns)
        return await _complete_chat(gw, req.model, plan, turns)


def chat_usage(gw: Gateway, prep: Prepared, turns: ChatTurns) -> dict[str, Any]:
    usage = R.usage_to_openai(turns.usage(), len(prep.generate.prompt_token_ids), turns.gen.finish)
    if turns.server is not None:  # beyond OpenAI's usage: what the server-side tool rounds did
        usage["tool_rounds"] = turns.rounds
        usage["tool_trimmed_tokens"] = turns.trimmed_tokens
    return usage


async def _complete_chat(gw: Gateway, model: str, plan: ChatPlan, turns: ChatTurns) -> web.StreamResponse:
    prep = plan.prep
    if await drain(client_deltas(plan, turns), lambda why: observe_failure(gw, turns.gen.finish, why)) is None:
        return web.Response(status=CLIENT_CLOSED)
    gen = turns.gen
    try:
        message = client_message(plan, turns.message())
        reason = R.finish_reason(gen.finish, turns.has_client_calls)
    except ApiError:
        observe_failure(gw, gen.finish, "error")
        raise
    usage = chat_usage(gw, prep, turns)
    observe(gw, gen, reason, usage)
    return web.json_response(R.chat_completion(prep.request_id, model, prep.created, message, reason, usage))


async def _stream_chat(gw: Gateway, request: web.Request, model: str, plan: ChatPlan,
                       turns: ChatTurns) -> web.StreamResponse:
    sse, prep = SseWriter(request), plan.prep

    def chunk(delta: dict[str, Any] | None, finish: str | None = None, usage: dict | None = None) -> dict:
        return R.chat_chunk(prep.request_id, model, prep.created, delta, finish, usage, prep.include_usage)

    async def send_events() -> None:
        await sse.send(chunk({"role": "assistant", "content": ""}))
        async with contextlib.aclosing(client_deltas(plan, turns)) as deltas:
            async for delta in deltas:
                await sse.send(chunk(delta))
        gen = turns.gen
        try:
            reason = R.finish_reason(gen.finish, turns.has_client_calls)
        except ApiError as e:
            observe_failure(gw, gen.finish, "error")
            await sse.send(e.body())
            return
        usage = chat_usage(gw, prep, turns)
        observe(gw, gen, reason, usage)
        await sse.send(chunk({}, reason))
        if prep.include_usage:
            await sse.send(chunk(None, usage=usage))

    return await stream(sse, send_events, lambda why: observe_failure(gw, turns.gen.finish, why), prep.request_id)


# --- completions -------------------------------------------------------------------------------------------------

async def completions(request: web.Request) -> web.StreamResponse:
    gw = request.app[GATEWAY]
    timing = Timing()
    req = decode(await request.read(), CompletionRequest)
    max_tokens = check_completion(req)
    check_model(gw, req.model)
    prompt = completion_prompt(req)
    if isinstance(prompt, str):
        prompt_ids = await _encode(gw, prompt, add_special_tokens=True)
    else:
        prompt_ids = prompt
        vocab = gw.tokenizer.vocab_size
        if any(not 0 <= t < vocab for t in prompt_ids):
            raise bad_request(f"prompt token ids must be in [0, {vocab})", param="prompt", code="invalid_value")
    prep = _prepare(gw, request, req, prompt_ids, max_tokens, "cmpl", timing, response_format_grammar(req))
    async with admitted(gw, prep.ticket):
        gen = _generation(gw, request, prep)
        if req.stream:
            return await _stream_completion(gw, request, req.model, prep, gen)
        pieces = await drain(_events(gw, prep.request_id, gen), lambda why: observe_failure(gw, gen.finish, why))
        if pieces is None:
            return web.Response(status=CLIENT_CLOSED)
        try:
            reason = R.finish_reason(gen.finish, False)
        except ApiError:
            observe_failure(gw, gen.finish, "error")
            raise
        usage = R.usage_to_openai(gen.finish.usage, len(prompt_ids), gen.finish)
        observe(gw, gen, reason, usage)
        return web.json_response(R.text_completion(prep.request_id, req.model, prep.created, "".join(pieces), reason,
                                                   usage))


async def _stream_completion(gw: Gateway, request: web.Request, model: str, prep: Prepared,
                             gen: Generation) -> web.StreamResponse:
    sse = SseWriter(request)

    def chunk(text: str | None, finish: str | None = None, usage: dict | None = None) -> dict:
        return R.text_completion(prep.request_id, model, prep.created, text, finish, usage, prep.include_usage,
                                 chunk=True)

    async def send_events() -> None:
        await sse.start()
        async with contextlib.aclosing(_events(gw, prep.request_id, gen)) as events:
            async for text in events:
                await sse.send(chunk(text))
        try:
            reason = R.finish_reason(gen.finish, False)
        except ApiError as e:
            observe_failure(gw, gen.finish, "error")
            await sse.send(e.body())
            return
        usage = R.usage_to_openai(gen.finish.usage, len(prep.generate.prompt_token_ids), gen.finish)
        observe(gw, gen, reason, usage)
        await sse.send(chunk("", reason))
        if prep.include_usage:
            await sse.send(chunk(None, usage=usage))

    return await stream(sse, send_events, lambda why: observe_failure(gw, gen.finish, why), prep.request_id)


# --- models, health, metrics -------------------------------------------------------------------------------------

def _model_card(gw: Gateway) -> dict[str, Any]:
    return {"id": gw.config.model_name, "object": "model", "created": gw.started_s, "owned_by": "specrelay",
            "max_model_len": gw.config.max_model_len}


async def list_models(request: web.Request) -> web.Response:
    return web.json_response({"object": "list", "data": [_model_card(request.app[GATEWAY])]})


async def get_model(request: web.Request) -> web.Response:
    gw = request.app[GATEWAY]
    if request.match_info["model"] != gw.config.model_name:
        raise ApiError(404, f"the model {request.match_info['model']!r} does not exist", param="model",
                       code="model_not_found")
    return web.json_response(_model_card(gw))


async def health(request: web.Request) -> web.Response:
    gw = request.app[GATEWAY]
    return web.json_response({"status": "ok", "model": gw.config.model_name,
                              "running": gw.admission.num_running, "queued": gw.admission.num_waiting})


async def metrics(request: web.Request) -> web.Response:
    return web.Response(body=request.app[GATEWAY].metrics.render(), headers={"Content-Type": CONTENT_TYPE})
