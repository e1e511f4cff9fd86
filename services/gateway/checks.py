"""The value checks msgspec's types cannot express, each refusal a 400 naming the field; and the request's fields
read the way the rest of the gateway uses them (the stop strings, the top-k, the one prompt of a completion).
"""

from __future__ import annotations

import math
from typing import Any

from specrelay.services.gateway.errors import ApiError, bad_request
from specrelay.services.gateway.schemas import ChatCompletionRequest, CompletionRequest, NamedToolChoice, Sampling

SLO_CLASSES = ("interactive", "deadline", "batch")
MAX_STOP_STRINGS = 4
MAX_CHOICES = 16  # `n`: each choice is a generation of its own (and, today, a prefill of its own)
MAX_TOP_LOGPROBS = 20  # chat's top_logprobs, as OpenAI
MAX_COMPLETION_LOGPROBS = 5  # completions' logprobs, as OpenAI
MAX_LOGIT_BIAS = 100.0

# Free-form JSON (a tool's parameter schema, response_format) nests at most this deep: templates and tool code walk
# it recursively, and a JSON Schema needs nowhere near this many levels.
MAX_JSON_DEPTH = 64

# OpenAI chat fields this server refuses when set to anything but null, and why (never accepted and ignored).
UNSUPPORTED_CHAT = {
    "functions": "the legacy 'functions' parameter is not supported: send the same schemas as 'tools' "
                 "([{\"type\": \"function\", \"function\": {...}}])",
    "function_call": "the legacy 'function_call' parameter is not supported: use 'tool_choice'",
    "audio": "audio output is not supported (this server generates text)",
    "prediction": "predicted outputs are not supported",
    "reasoning_effort": "reasoning_effort is not supported: the served model is not a reasoning model",
    "verbosity": "verbosity is not supported by the served model",
    "web_search_options": "web search is not supported",
}
SERVICE_TIERS = ("auto", "default")  # one tier here: what these two promise; flex / priority / scale are refused


def json_depth(value: Any) -> int:
    """How deep containers nest in a decoded JSON value (a scalar is 0, {} and [1] are 1); iterative."""
    depth, level = 0, [value]
    while containers := [v for v in level if isinstance(v, (dict, list))]:
        depth += 1
        level = [c for v in containers for c in (v.values() if isinstance(v, dict) else v)]
    return depth


def check_sampling(req: Sampling, max_tokens: int | None, max_tokens_param: str) -> None:
    """Value checks shared by both endpoints (types were checked by `decode`)."""
    num_choices(req)
    if req.response_format is not None:
        _check_depth(req.response_format, "response_format")
    for name in ("presence_penalty", "frequency_penalty"):
        if getattr(req, name):
            raise bad_request(f"{name} is not supported (only 0)", param=name, code="unsupported_value")
    if max_tokens is not None and max_tokens < 1:
        raise bad_request(f"{max_tokens_param} must be at least 1, got {max_tokens}", param=max_tokens_param,
                          code="invalid_value")
    if req.temperature is not None and not 0.0 <= req.temperature <= 2.0:
        raise bad_request(f"temperature must be in [0, 2], got {req.temperature}", param="temperature",
                          code="invalid_value")
    if req.top_p is not None and not 0.0 < req.top_p <= 1.0:
        raise bad_request(f"top_p must be in (0, 1], got {req.top_p}", param="top_p", code="invalid_value")
    stops = stop_strings(req)
    if len(stops) > MAX_STOP_STRINGS:
        raise bad_request(f"at most {MAX_STOP_STRINGS} stop sequences, got {len(stops)}", param="stop",
                          code="invalid_value")
    if any(not s for s in stops):
        raise bad_request("stop sequences must be non-empty strings", param="stop", code="invalid_value")
    if req.slo_class is not None and req.slo_class not in SLO_CLASSES:
        raise bad_request(f"slo_class {req.slo_class!r} is not one of {', '.join(SLO_CLASSES)}",
                          param="slo_class", code="invalid_value")
    if req.deadline_ms is not None and not req.deadline_ms > 0:
        raise bad_request(f"deadline_ms must be > 0 (milliseconds from arrival), got {req.deadline_ms}",
                          param="deadline_ms", code="invalid_value")


def num_choices(req: Sampling) -> int:
    """`n`: how many choices to generate for the prompt, 1..MAX_CHOICES."""
    if req.n is not None and not 1 <= req.n <= MAX_CHOICES:
        raise bad_request(f"n must be in [1, {MAX_CHOICES}], got {req.n}", param="n", code="invalid_value")
    return req.n or 1


def requested_logprobs(req: Sampling, chat: bool) -> int | None:
    """The alternatives per token the request asks logprobs for (SamplingSpec.logprobs), None for no logprobs.
    Chat: `logprobs: true` and `top_logprobs` 0..20; completions: `logprobs` 0..5 (OpenAI's two APIs)."""
    if chat:
        if req.logprobs is not None and not isinstance(req.logprobs, bool):
            raise bad_request("logprobs is a boolean in chat completions (the number of alternatives is "
                              "top_logprobs)", param="logprobs", code="invalid_value")
        top = req.top_logprobs
        if top is not None and not 0 <= top <= MAX_TOP_LOGPROBS:
            raise bad_request(f"top_logprobs must be in [0, {MAX_TOP_LOGPROBS}], got {top}", param="top_logprobs",
                              code="invalid_value")
        if top and not req.logprobs:
            raise bad_request("top_logprobs needs logprobs: true", param="top_logprobs", code="invalid_value")
        return (top or 0) if req.logprobs else None
    if req.top_logprobs:
        raise bad_request("top_logprobs is a chat completions parameter; completions take logprobs: k",
                          param="top_logprobs", code="invalid_value")
    if req.logprobs is None or req.logprobs is False:
        return None
    if req.logprobs is True or not 0 <= req.logprobs <= MAX_COMPLETION_LOGPROBS:
        raise bad_request(f"logprobs must be an integer in [0, {MAX_COMPLETION_LOGPROBS}], got "
                          f"{str(req.logprobs).lower()}", param="logprobs", code="invalid_value")
    return req.logprobs


def logit_bias(req: Sampling, vocab_size: int) -> dict[int, float]:
    """`logit_bias` as token id -> bias (SamplingSpec.logit_bias): ids of this tokenizer's vocabulary, biases in
    [-100, 100]; a bias of 0 changes nothing and is left out."""
    out: dict[int, float] = {}
    for key, bias in (req.logit_bias or {}).items():
        if not (key.isascii() and key.isdigit()) or int(key) >= vocab_size:
            raise bad_request(f"logit_bias keys must be token ids in [0, {vocab_size}), got {key[:40]!r}",
                              param="logit_bias", code="invalid_value")
        if not (math.isfinite(bias) and -MAX_LOGIT_BIAS <= bias <= MAX_LOGIT_BIAS):
            raise bad_request(f"logit_bias values must be in [-100, 100], got {bias} for token {key}",
                              param="logit_bias", code="invalid_value")
        if bias:
            out[int(key)] = float(bias)
    return out


def _check_depth(value: Any, param: str) -> None:
    if json_depth(value) > MAX_JSON_DEPTH:
        raise bad_request(f"{param} nests deeper than {MAX_JSON_DEPTH} levels", param=param, code="invalid_value")


def top_k(req: Sampling) -> int:
    """The top-k the verifier applies: 0 (off) for none, 0 or -1."""
    return max(req.top_k or 0, 0)


def stop_strings(req: Sampling) -> list[str]:
    if req.stop is None:
        return []
    return [req.stop] if isinstance(req.stop, str) else list(req.stop)


def check_chat(req: ChatCompletionRequest) -> int | None:
    """Chat-only checks; returns the requested output limit (max_completion_tokens wins over max_tokens)."""
    param = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
    max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    check_sampling(req, max_tokens, param)
    requested_logprobs(req, chat=True)
    if not req.messages:
        raise bad_request("messages must hold at least one message", param="messages", code="invalid_value")
    names = [t.function.name for t in req.tools or []]
    if len(set(names)) != len(names):
        raise bad_request("tools: function names must be unique", param="tools", code="invalid_value")
    for i, tool in enumerate(req.tools or []):
        params = tool.function.parameters
        if params is not None and params.get("type", "object") != "object":
            raise bad_request("a function's parameters must be a JSON Schema of type 'object'",
                              param=f"tools[{i}].function.parameters", code="invalid_value")
        if params is not None:
            _check_depth(params, f"tools[{i}].function.parameters")
    if isinstance(req.tool_choice, NamedToolChoice) and req.tool_choice.function.name not in names:
        raise bad_request(f"tool_choice names {req.tool_choice.function.name!r}, which is not among the tools",
                          param="tool_choice", code="invalid_value")
    if req.tool_choice == "required" and not names:
        raise bad_request("tool_choice 'required' needs tools", param="tool_choice", code="invalid_value")
    for field, why in UNSUPPORTED_CHAT.items():
        if getattr(req, field) is not None:
            raise bad_request(why, param=field, code="unsupported_parameter")
    if req.store:
        raise bad_request("store=true is not supported: this server stores no completion", param="store",
                          code="unsupported_value")
    if req.metadata:
        raise bad_request("metadata tags a stored completion, and this server stores none", param="metadata",
                          code="unsupported_value")
    if req.modalities is not None and req.modalities != ["text"]:
        raise bad_request(f"modalities {req.modalities} are not supported (only [\"text\"])", param="modalities",
                          code="unsupported_value")
    if req.service_tier is not None and req.service_tier not in SERVICE_TIERS:
        raise bad_request(f"service_tier {req.service_tier!r} is not supported (only {', '.join(SERVICE_TIERS)})",
                          param="service_tier", code="unsupported_value")
    return max_tokens


def check_completion(req: CompletionRequest) -> int | None:
    check_sampling(req, req.max_tokens, "max_tokens")
    requested_logprobs(req, chat=False)
    if req.echo:
        raise bad_request("echo is not supported", param="echo", code="unsupported_value")
    if req.suffix:
        raise bad_request("suffix is not supported", param="suffix", code="unsupported_value")
    if req.best_of not in (None, 1):
        raise bad_request(f"best_of={req.best_of} is not supported: specrelay generates one candidate per request "
                          f"(best_of=1)", param="best_of", code="unsupported_value")
    prompt = completion_prompt(req)
    if not prompt:
        raise bad_request("prompt must not be empty", param="prompt", code="invalid_value")
    return req.max_tokens


def completion_prompt(req: CompletionRequest) -> str | list[int]:
    """The request's one prompt, text or token ids. OpenAI's forms: "text", ["text"], [ids], [[ids]]; a list of
    several prompts (a batch: one choice per prompt) is refused, as specrelay answers one choice per request."""
    prompt = req.prompt
    if isinstance(prompt, str):
        return prompt
    if prompt and all(isinstance(p, str) or _is_token_ids(p) for p in prompt):
        if len(prompt) > 1:
            raise bad_request(f"one prompt per request: this list holds {len(prompt)} prompts (a batch is not "
                              f"supported)", param="prompt", code="unsupported_value")
        return prompt[0]
    if _is_token_ids(prompt):
        return prompt
    raise bad_request("prompt must be a string, a list of token ids, or a list holding one of those",
                      param="prompt", code="invalid_value")


def _is_token_ids(value: Any) -> bool:
    return isinstance(value, list) and all(type(t) is int for t in value)  # JSON true/false decode as bool


def header_extensions(headers: Any, req: Sampling) -> tuple[str | None, float | None]:
    """SLO class and relative deadline: body fields win over headers X-SLO-Class / X-Deadline-Ms."""
    slo, deadline = req.slo_class, req.deadline_ms
    if slo is None and headers.get("X-SLO-Class"):
        slo = headers["X-SLO-Class"].strip().lower()
        if slo not in SLO_CLASSES:
            raise ApiError(400, f"X-SLO-Class {slo!r} is not one of {', '.join(SLO_CLASSES)}",
                           param="X-SLO-Class", code="invalid_value")
    if deadline is None and headers.get("X-Deadline-Ms"):
        try:
            deadline = float(headers["X-Deadline-Ms"])
        except ValueError:
            deadline = -1.0
        if not deadline > 0:
            raise ApiError(400, "X-Deadline-Ms must be a positive number of milliseconds",
                           param="X-Deadline-Ms", code="invalid_value")
    return slo, deadline
