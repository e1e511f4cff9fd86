"""OpenAI-shaped error bodies, and the middleware that guarantees every failure leaves the server as one.

`{"error": {"message", "type", "param", "code"}}` is what the OpenAI SDKs parse into `APIError.message/.code/.param`,
so a client sees *what* is wrong and *which field*, never a stack trace. The server keeps serving: an unexpected
exception becomes a 500 body and a log line, not a dead connection.
"""

from __future__ import annotations

import logging
from typing import Any

from aiohttp import web

log = logging.getLogger(__name__)

# HTTP status -> OpenAI error type (as the OpenAI API names them).
_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
          405: "invalid_request_error", 413: "invalid_request_error", 429: "rate_limit_error",
          500: "server_error", 503: "service_unavailable", 504: "timeout_error"}


class ApiError(Exception):
    """A request the gateway refuses or cannot finish; raised anywhere under a handler, rendered by the
    middleware."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 type: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.type = type or _TYPES.get(status, "invalid_request_error" if status < 500 else "server_error")
        self.headers = headers

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.param, self.code)


def bad_request(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    return ApiError(400, message, param=param, code=code)


def error_body(message: str, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def error_response(err: ApiError) -> web.Response:
    return web.json_response(err.body(), status=err.status, headers=err.headers)


@web.middleware
async def error_middleware(request: web.Request, handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except ApiError as e:
        return error_response(e)
    except web.HTTPException as e:
        # aiohttp's own 404/405/413 (no route, wrong method, body too large) in the same shape as ours.
        if e.status < 400:
            raise
        code = {404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}.get(e.status)
        message = {404: f"no route for {request.method} {request.path}",
                   405: f"method {request.method} is not allowed on {request.path}"}.get(e.status, e.reason)
        headers = {k: v for k, v in e.headers.items() if k.lower() == "allow"}
        return error_response(ApiError(e.status, message, code=code, headers=headers or None))
    except Exception:  # noqa: BLE001 - the last line of defence: log the trace, answer without it
        log.exception("gateway: unhandled error in %s %s", request.method, request.path)
        return error_response(ApiError(500, "internal server error", code="internal_error"))
