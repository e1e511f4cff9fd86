import dataclasses

import msgspec
import pytest

from specrelay.shared.errors import SpecrelayError
from specrelay.shared.messages import SamplingSpec
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
