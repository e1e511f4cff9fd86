"""A request's exchange with the verifier, from the handler's side: validated and tokenized into a `Prepared`,
admitted under its ticket (`admitted`), then generated through an `Exchange`, which starts each `Generation` of
the request (a later tool round's, a fallback's) and reports its tokens to the scheduler and the metrics.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from dataclasses import dataclass
from typing import AsyncIterator

import msgspec
from aiohttp import web

from specrelay.services.gateway import responses as R
from specrelay.services.gateway.admission import AdmissionFull, Ticket
from specrelay.services.gateway.checks import (
    header_extensions,
    logit_bias,
    num_choices,
    requested_logprobs,
    stop_strings,
    top_k,
)
from specrelay.services.gateway.errors import ApiError, bad_request
from specrelay.services.gateway.generation import Generation, Timeouts, Timing
from specrelay.services.gateway.metrics import InterTokenLatency
from specrelay.services.gateway.schemas import Sampling
from specrelay.services.gateway.sse import client_gone
from specrelay.services.gateway.state import Gateway
from specrelay.shared.messages import Continue, Generate, SamplingSpec

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
    num_choices: int = 1  # `n`


def prepare(gw: Gateway, request: web.Request, req: Sampling, prompt_ids: list[int], max_tokens: int | None,
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
        stop_token_ids=[] if req.ignore_eos else list(gw.stop_token_ids), grammar=grammar,
        logprobs=requested_logprobs(req, chat=id_prefix != "cmpl"), logit_bias=logit_bias(req, gw.tokenizer.vocab_size))
    generate = Generate(request_id=request_id, prompt_token_ids=prompt_ids, sampling=sampling, reply_to="",
                        model=cfg.model_name, slo_class=slo_class or "interactive",
                        deadline_ms=None if deadline_ms is None else arrival_ms + deadline_ms, arrival_ms=arrival_ms)
    ticket = Ticket(request_id, generate.slo_class, timing.arrival_s,
                    None if deadline_ms is None else timing.arrival_s + deadline_ms / 1000, len(prompt_ids), limit)
    include_usage = bool(req.stream_options and req.stream_options.include_usage)
    return Prepared(request_id, R.now_s(), generate, stop_strings(req), ticket, timing, include_usage,
                    num_choices(req))


async def encode(gw: Gateway, text: str, add_special_tokens: bool = False) -> list[int]:
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


def choice_seed(seed: int | None, index: int) -> int | None:
    """Choice `index`'s seed of a request with `seed`: seed + index, wrapped into int64 (choice 0 is the request of
    n=1; each other choice samples apart from it, and the same again for the same request)."""
    if seed is None:
        return None
    return (seed + index + 2**63) % 2**64 - 2**63


class Exchange:
    """One prepared request's generations, for its choice `index` (`n` > 1: each choice is generated on its own,
    under its own request id and seed). Nothing is sent until a generation's events are read."""

    def __init__(self, gw: Gateway, request: web.Request, prep: Prepared, index: int = 0):
        self.gw, self.request, self.prep, self.index = gw, request, prep, index
        self.tokenizer, self.metrics, self.config = gw.tokenizer, gw.metrics, gw.config
        self.generate = prep.generate
        if index:
            sampling = msgspec.structs.replace(prep.generate.sampling,
                                               seed=choice_seed(prep.generate.sampling.seed, index))
            self.generate = msgspec.structs.replace(prep.generate, request_id=f"{prep.request_id}-{index}",
                                                    sampling=sampling)

    def choice(self, index: int) -> Exchange:
        return Exchange(self.gw, self.request, self.prep, index)

    def generation(self, generate: Generate | None = None,
                   resume: tuple[str, Continue] | None = None) -> Generation:
        """A generation of the request (`generate`: a later turn's; `resume`: go on with a held turn's KV)."""
        gw, prep = self.gw, self.prep
        continue_s = gw.server_tools.continue_timeout_s if gw.server_tools is not None else None
        timeouts = Timeouts(gw.config.chunk_timeout_s, gw.config.cancel_grace_s, continue_s)
        return Generation(gw.bus, gw.tokenizer, generate or self.generate, prep.stops,
                          lambda: client_gone(self.request), timeouts, prep.timing, resume=resume)

    async def events(self, gen: Generation) -> AsyncIterator[str]:
        """`gen`'s text deltas, with the tokens behind them reported to the scheduler as they arrive: the SLO
        policy learns time per token and output lengths from them. They are reported under the admission ticket's
        request id (a tool round's fallback may run under another id at the verifier); with `n` > 1, choice 0's
        alone, as the scheduler sizes a request by one generation."""
        admission, request_id, reports = self.gw.admission, self.prep.request_id, self.index == 0
        completed = False
        itl = InterTokenLatency(self.metrics.vllm.itl)
        try:
            async with contextlib.aclosing(gen.events()) as events:
                async for text in events:
                    if reports:
                        admission.progress(request_id, gen.text.num_tokens)
                    itl.arrived(gen.text.num_tokens)
                    yield text
            completed = gen.finish is not None and gen.finish.reason in ("stop", "length")
        finally:
            if reports:
                admission.finished(request_id, gen.text.num_tokens, completed)
