import pytest

from specrelay.shared.slo import DEFAULT_SLOS, Slo, SloSpecError, format_slos, parse_slo_specs


def test_a_plain_spec_sets_every_class_and_bare_numbers_are_ms():
    slos = parse_slo_specs(["ttft=500,tpot=40ms,e2e=2.5s"])
    for cls in ("interactive", "deadline", "batch"):
        assert slos[cls] == Slo(ttft_ms=500.0, tpot_ms=40.0, e2e_ms=2500.0)


def test_a_class_spec_overrides_only_that_class_and_keeps_other_targets():
    slos = parse_slo_specs(["e2e=60s", "interactive:ttft=300ms"])
    assert slos["interactive"] == Slo(ttft_ms=300.0, tpot_ms=DEFAULT_SLOS["interactive"].tpot_ms, e2e_ms=60_000.0)
    assert slos["deadline"] == Slo(e2e_ms=60_000.0)
    assert slos["batch"] == Slo(e2e_ms=60_000.0)


def test_no_spec_gives_the_defaults():
    assert parse_slo_specs(None) == DEFAULT_SLOS
    assert "interactive:ttft=1000ms,tpot=100ms" in format_slos(DEFAULT_SLOS)
    assert "batch:none" in format_slos(DEFAULT_SLOS)


@pytest.mark.parametrize("spec, message", [
    ("ttft", "not key=value"),
    ("latency=5", "unknown key 'latency'"),
    ("ttft=fast", "not a duration"),
    ("ttft=-5", "not a duration"),
    ("ttft=0", "must be positive"),
    ("ttft=5,ttft=6", "ttft given twice"),
    ("gold:ttft=5", "unknown class 'gold'"),
    ("", "empty --slo"),
    ("ttft=5min", "not a duration"),
])
def test_bad_specs_say_what_is_wrong(spec, message):
    with pytest.raises(SloSpecError, match=message):
        parse_slo_specs([spec])
