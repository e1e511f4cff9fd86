"""A request's sampling on the bus (`SamplingSpec`, a msgspec Struct) and in the engine (`SamplingParams`, validated
at construction): the one conversion each way. The fields are the same, by name; the stop tokens are a list on the
wire and a tuple in the engine (immutable: requests share their params); so is logit_bias, a dict on the wire and
(token id, bias) pairs in the engine."""

from __future__ import annotations

from specrelay.shared.messages import SamplingSpec
from specrelay.shared.sampling import SamplingParams


def params_from_spec(spec: SamplingSpec) -> SamplingParams:
    """Raises SpecrelayError for values the engine refuses (a negative temperature, top_p outside (0, 1], ...)."""
    return SamplingParams(temperature=spec.temperature, top_k=spec.top_k, top_p=spec.top_p, seed=spec.seed,
                          max_tokens=spec.max_tokens, stop_token_ids=tuple(spec.stop_token_ids), grammar=spec.grammar,
                          logprobs=spec.logprobs, logit_bias=tuple(sorted(spec.logit_bias.items())))


def spec_from_params(params: SamplingParams) -> SamplingSpec:
    return SamplingSpec(temperature=params.temperature, top_p=params.top_p, top_k=params.top_k, seed=params.seed,
                        max_tokens=params.max_tokens, stop_token_ids=list(params.stop_token_ids), grammar=params.grammar,
                        logprobs=params.logprobs, logit_bias=dict(params.logit_bias))
