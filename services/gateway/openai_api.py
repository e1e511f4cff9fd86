"""The OpenAI-compatible handlers: /v1/chat/completions, /v1/completions, /v1/models, /health, /metrics.

Every generating handler reads top to bottom: decode and check (schemas.py, checks.py) -> render and tokenize
(chat_plan.py, exchange.py) -> admit -> generate and shape the response (streamer.py). Refusals are `ApiError`s
rendered by the error middleware.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from specrelay.services.gateway import responses as R
from specrelay.services.gateway.chat_plan import plan_chat
from specrelay.services.gateway.checks import check_chat, check_completion, completion_prompt
from specrelay.services.gateway.errors import ApiError, bad_request
from specrelay.services.gateway.exchange import Exchange, Prepared, admitted, check_model, encode, prepare
from specrelay.services.gateway.generation import Timing
from specrelay.services.gateway.logprobs import LogprobsView
from specrelay.services.gateway.metrics import CONTENT_TYPE
from specrelay.services.gateway.schemas import ChatCompletionRequest, CompletionRequest, decode
from specrelay.services.gateway.state import GATEWAY, Gateway
from specrelay.services.gateway.streamer import TextChoice, respond
from specrelay.services.gateway.structured import response_format_grammar
from specrelay.services.gateway.tool_rounds import ChatTurns


async def chat_completions(request: web.Request) -> web.StreamResponse:
    gw = request.app[GATEWAY]
    timing = Timing()
    req = decode(await request.read(), ChatCompletionRequest)
    max_tokens = check_chat(req)
    check_model(gw, req.model)
    plan = await plan_chat(gw, request, req, max_tokens, timing)
    prep = plan.prep
    shape = R.ChatShape(prep.request_id, req.model, prep.created, prep.include_usage, _logprobs_view(gw, prep))
    async with admitted(gw, prep.ticket):
        turns = [ChatTurns(plan, index) for index in range(prep.num_choices)]
        return await respond(gw, request, shape, turns, bool(req.stream))


async def completions(request: web.Request) -> web.StreamResponse:
    gw = request.app[GATEWAY]
    timing = Timing()
    req = decode(await request.read(), CompletionRequest)
    max_tokens = check_completion(req)
    check_model(gw, req.model)
    prompt = completion_prompt(req)
    if isinstance(prompt, str):
        prompt_ids = await encode(gw, prompt, add_special_tokens=True)
    else:
        prompt_ids = prompt
        vocab = gw.tokenizer.vocab_size
        if any(not 0 <= t < vocab for t in prompt_ids):
            raise bad_request(f"prompt token ids must be in [0, {vocab})", param="prompt", code="invalid_value")
    prep = prepare(gw, request, req, prompt_ids, max_tokens, "cmpl", timing, response_format_grammar(req))
    shape = R.CompletionShape(prep.request_id, req.model, prep.created, prep.include_usage, _logprobs_view(gw, prep))
    async with admitted(gw, prep.ticket):
        exchange = Exchange(gw, request, prep)
        choices = [TextChoice(exchange.choice(index)) for index in range(prep.num_choices)]
        return await respond(gw, request, shape, choices, bool(req.stream))


def _logprobs_view(gw: Gateway, prep: Prepared) -> LogprobsView | None:
    k = prep.generate.sampling.logprobs
    return None if k is None else LogprobsView(gw.tokenizer, k)


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
