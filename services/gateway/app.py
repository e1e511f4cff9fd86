"""The gateway's aiohttp application: routes, middlewares (metrics, errors, API keys) and background tasks.

`create_app` takes a running bus and a tokenizer, so `specrelay serve` (everything in one process) and
`specrelay gateway` (its own process, Redis bus) build the same app; tests build it around a fake verifier.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging

from aiohttp import web

from specrelay.services.gateway import openai_api, responses_api
from specrelay.services.gateway.admission import Admission, make_policy
from specrelay.services.gateway.errors import ApiError, error_middleware
from specrelay.services.gateway.metrics import GatewayMetrics, KvStatsSource
from specrelay.services.gateway.state import GATEWAY, Gateway, GatewayConfig, end_of_turn_ids
from specrelay.services.gateway.tools import ServerTools
from specrelay.shared.bus import Bus, BusUnavailable
from specrelay.shared.messages import CANCEL_STREAM, GENERATE_STREAM, Preempt
from specrelay.shared.tokenizer import Tokenizer

log = logging.getLogger(__name__)

OPEN_PATHS = ("/health", "/metrics")  # reachable without an API key (probes and scrapers)


def create_app(config: GatewayConfig, bus: Bus, tokenizer: Tokenizer,
               kv_stats: KvStatsSource | None = None, server_tools: ServerTools | None = None) -> web.Application:
    """The app; the caller owns `bus` (opens and closes it). `kv_stats` feeds the KV-block gauges of /metrics
    when the verifier runs in this process; `server_tools` turns on tool rounds inside requests (tool_rounds.py)."""
    gateway = Gateway(config=config, bus=bus, tokenizer=tokenizer,
                      metrics=GatewayMetrics(kv_stats, config.model_name),
                      admission=Admission(make_policy(config.policy, config.class_slos), config.max_running,
                                          config.max_queued),
                      stop_token_ids=end_of_turn_ids(tokenizer), server_tools=server_tools)
    gateway.admission.on_preempt = _preempt_sender(bus, gateway.metrics)
    app = web.Application(client_max_size=config.max_body_bytes,
                          middlewares=[_metrics_middleware, error_middleware, _auth_middleware])
    app[GATEWAY] = gateway
    app.router.add_post("/v1/chat/completions", openai_api.chat_completions)
    app.router.add_post("/v1/completions", openai_api.completions)
    app.router.add_post("/v1/responses", responses_api.create_response)
    app.router.add_get("/v1/models", openai_api.list_models)
    app.router.add_get("/v1/models/{model}", openai_api.get_model)
    app.router.add_get("/health", openai_api.health)
    app.router.add_get("/metrics", openai_api.metrics)
    app.cleanup_ctx.append(_sample_verifier_queue)
    return app


def _preempt_sender(bus: Bus, metrics: GatewayMetrics):
    """Admission's `on_preempt`: publish `Preempt` to the verifiers, one after another (a resume never overtakes
    its pause), and count pauses in `vllm:num_preemptions_total`."""
    last: asyncio.Future | None = None

    async def send(prev: asyncio.Future | None, msg: Preempt) -> None:
        if prev is not None:
            await asyncio.gather(prev, return_exceptions=True)
        try:
            await bus.publish(CANCEL_STREAM, msg)
        except BusUnavailable as e:  # the request goes on unpaused, or stays paused until the bus is back
            log.warning("gateway: could not send %s (%s)", msg, e)

    def on_preempt(request_id: str, resume: bool) -> None:
        nonlocal last
        if not resume:
            metrics.vllm.preemptions.inc()
        last = asyncio.ensure_future(send(last, Preempt(request_id, resume)))

    return on_preempt


@web.middleware
async def _auth_middleware(request: web.Request, handler) -> web.StreamResponse:
    keys = request.app[GATEWAY].config.api_keys
    if keys and request.path not in OPEN_PATHS:
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        # aiohttp decodes header bytes as UTF-8 with surrogate escapes: a key that is not UTF-8 still compares (and
        # fails) as bytes instead of raising. compare_digest against every key: the time taken does not tell which
        # key nearly matched.
        token = token.strip().encode("utf-8", "surrogatepass")
        valid = scheme.lower() == "bearer" and any(
            [hmac.compare_digest(token, key.encode("utf-8", "surrogatepass")) for key in keys])
        if not valid:
            message = ("missing API key: send 'Authorization: Bearer <key>'" if not token else
                       "incorrect API key provided")
            raise ApiError(401, message, code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
    return await handler(request)


@web.middleware
async def _metrics_middleware(request: web.Request, handler) -> web.StreamResponse:
    response = await handler(request)  # the error middleware inside turns every failure into a response
    route = request.match_info.route.resource
    endpoint = route.canonical if route is not None else "unmatched"
    request.app[GATEWAY].metrics.requests.inc(endpoint=endpoint, status=str(response.status))
    return response


async def _sample_verifier_queue(app: web.Application):
    """Background task for the app's lifetime: the verifier's backlog as a gauge (pending + undelivered Generates
    of the verifiers' group: one XINFO GROUPS on Redis)."""
    gateway = app[GATEWAY]

    async def loop() -> None:
        while True:
            try:
                gateway.metrics.verifier_queue.set(await gateway.bus.queue_depth(GENERATE_STREAM, "verifier"))
            except Exception as e:  # noqa: BLE001 - a metrics sample must never take the gateway down
                log.warning("gateway: cannot sample the verifier queue: %s", e)
            await asyncio.sleep(gateway.config.queue_sample_s)

    task = asyncio.create_task(loop(), name="gateway-queue-sampler")
    yield
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
