"""The gateway's settings and the runtime objects its handlers share (one per app, under `GATEWAY`)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from aiohttp import web

from specrelay.services.gateway.admission import POLICIES, Admission, make_policy
from specrelay.services.gateway.metrics import GatewayMetrics
from specrelay.services.toolcoord.parser import FORMATS
from specrelay.shared.bus import Bus
from specrelay.shared.errors import ConfigError, SpecrelayError
from specrelay.shared.tokenizer import Tokenizer

if TYPE_CHECKING:
    from specrelay.services.gateway.tools import ServerTools

# Tokens that end a turn in the template families we serve, besides the tokenizer's own eos.
END_OF_TURN_TOKENS = ("<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<|end_of_text|>", "</s>")


@dataclass(frozen=True)
class GatewayConfig:
    model_name: str  # the `model` clients send and /v1/models lists
    max_model_len: int  # context length: prompt + generated tokens
    api_keys: tuple[str, ...] = ()  # bearer keys accepted on /v1/*; empty: no authentication
    tool_call_format: str = "hermes"  # how the model writes tool calls (toolcoord/parser.py)
    policy: str = "fcfs"  # admission order: fcfs | slo (admission.py, slo_policy.py)
    class_slos: tuple[str, ...] = ()  # `--class-slo` specs: the SLO policy's per-class targets over its defaults
    max_running: int = 256  # requests in flight to the verifier
    max_queued: int = 1024  # requests waiting for a slot; beyond: 503
    default_temperature: float = 1.0  # when a request gives none: the model's generation_config.json, else OpenAI's
    default_top_p: float = 1.0  # the same, for top_p
    chunk_timeout_s: float = 300.0  # silence from the verifier before a request fails with 504
    cancel_grace_s: float = 1.0  # wait for the verifier's final usage after a stop string
    queue_sample_s: float = 1.0  # how often the verifier's queue depth is sampled for /metrics
    max_body_bytes: int = 16 << 20

    def __post_init__(self):
        if not self.model_name:
            raise ConfigError("gateway: the served model name must not be empty")
        if self.max_model_len < 2:
            raise ConfigError(f"gateway: max_model_len must be >= 2, got {self.max_model_len}")
        if self.tool_call_format not in FORMATS:
            raise ConfigError(f"gateway: tool-call format {self.tool_call_format!r} is not one of "
                              f"{', '.join(FORMATS)}")
        if self.policy not in POLICIES:
            raise ConfigError(f"gateway: admission policy {self.policy!r} is not one of {', '.join(POLICIES)}")
        try:
            make_policy(self.policy, self.class_slos)
        except SpecrelayError as e:
            raise ConfigError(f"gateway: --class-slo: {e}") from None
        if self.max_running < 1 or self.max_queued < 0:
            raise ConfigError("gateway: max_running must be >= 1 and max_queued >= 0")
        if any(not key for key in self.api_keys):
            raise ConfigError("gateway: an API key must not be empty")


@dataclass
class Gateway:
    config: GatewayConfig
    bus: Bus
    tokenizer: Tokenizer
    metrics: GatewayMetrics
    admission: Admission
    stop_token_ids: list[int]  # passed to the verifier: generation ends at any of them
    server_tools: "ServerTools | None" = None  # tools the server runs itself, in rounds inside a request
    started_s: int = field(default_factory=lambda: int(time.time()))


def end_of_turn_ids(tokenizer: Tokenizer) -> list[int]:
    ids = {tokenizer.eos_token_id} | {tokenizer.token_to_id(t) for t in END_OF_TURN_TOKENS}
    return sorted(i for i in ids if i is not None)


GATEWAY = web.AppKey("gateway", Gateway)
