import dataclasses

import msgspec
import pytest

from specrelay.shared.errors import SpecrelayError
from specrelay.shared.messages import SamplingSpec, TokenChunk, TokenLogprob
from specrelay.shared.sampling import SamplingParams
from specrelay.shared.sampling_wire import params_from_spec, spec_from_params


def test_both_forms_have_the_same_fields_so_nothing_is_dropped_on_the_way():
    assert set(SamplingSpec.__struct_fields__) == {f.name for f in dataclasses.fields(SamplingParams)}


def test_a_request_sampling_survives_the_bus_and_back():
    spec = SamplingSpec(temperature=0.7, top_p=0.9, top_k=40, seed=11, max_tokens=64, stop_token_ids=[2, 5])
    wire = msgspec.msgpack.decode(msgspec.msgpack.encode(spec), type=SamplingSpec)
    params = params_from_spec(wire)
    assert params == SamplingParams(temperature=0.7, top_k=40, top_p=0.9, seed=11, max_tokens=64,
                                    stop_token_ids=(2, 5))
    assert spec_from_params(params) == spec


def test_values_the_engine_refuses_are_refused_at_the_conversion():
    with pytest.raises(SpecrelayError, match="top_p"):
        params_from_spec(SamplingSpec(top_p=0.0))


def test_logprobs_and_logit_bias_survive_the_bus_and_back():
    spec = SamplingSpec(temperature=0.5, logprobs=3, logit_bias={7: 100.0, 2: -100.0})
    wire = msgspec.msgpack.decode(msgspec.msgpack.encode(spec), type=SamplingSpec)
    params = params_from_spec(wire)
    assert params.logprobs == 3 and params.logit_bias == ((2, -100.0), (7, 100.0))
    assert spec_from_params(params) == spec


def test_a_chunk_carries_one_logprob_per_token_over_the_bus():
    chunk = TokenChunk("r", [5, 9], logprobs=[TokenLogprob(5, -0.25, [(5, -0.25), (3, -1.5)]), TokenLogprob(9, -2.0)])
    back = msgspec.msgpack.decode(msgspec.msgpack.encode(chunk), type=TokenChunk)
    assert back == chunk and back.logprobs[0].top == [(5, -0.25), (3, -1.5)]


@pytest.mark.parametrize("spec", [SamplingSpec(logprobs=21), SamplingSpec(logprobs=-1),
                                  SamplingSpec(logit_bias={3: 100.5}), SamplingSpec(logit_bias={-1: 1.0}),
                                  SamplingSpec(logit_bias={3: float("nan")})])
def test_logprobs_and_bias_out_of_range_are_refused(spec):
    with pytest.raises(SpecrelayError):
        params_from_spec(spec)
