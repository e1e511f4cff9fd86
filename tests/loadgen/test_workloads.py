from collections import Counter

import pytest
from openai.types.chat import ChatCompletionToolParam
from pydantic import TypeAdapter

from specrelay.loadgen.workloads import MIX_WEIGHTS, TOOL_PROFILES, TOOLS, make_task
from specrelay.shared.errors import ConfigError
from specrelay.shared.slo import DEFAULT_SLOS, parse_slo_specs


def test_tasks_are_seeded():
    assert make_task("mixed", 7, 1, DEFAULT_SLOS) == make_task("mixed", 7, 1, DEFAULT_SLOS)
    assert make_task("chat", 7, 1, DEFAULT_SLOS).prompt != make_task("chat", 7, 2, DEFAULT_SLOS).prompt


def test_the_mix_follows_its_weights():
    counts = Counter(make_task("mixed", i, 0, DEFAULT_SLOS).workload for i in range(4000))
    for name, weight in MIX_WEIGHTS.items():
        assert counts[name] / 4000 == pytest.approx(weight, abs=0.03)


def test_each_workload_has_its_class_and_targets():
    slos = parse_slo_specs(["interactive:ttft=300", "deadline:e2e=9s"])
    chat, agentic = make_task("chat", 0, 0, slos), make_task("agentic", 0, 0, slos)
    relay, research = make_task("relay", 0, 0, slos), make_task("research", 0, 0, slos)
    assert chat.slo_class == agentic.slo_class == "interactive" and chat.request_slo.ttft_ms == 300.0
    assert relay.slo_class == research.slo_class == "deadline" and relay.deadline_ms == research.deadline_ms == 9000.0
    assert 1 <= agentic.planned_steps <= 4 and 1 <= relay.num_workers <= 3
    assert research.max_tokens > chat.max_tokens


def test_the_tools_are_openai_tool_params_and_each_has_a_pause_profile():
    TypeAdapter(list[ChatCompletionToolParam]).validate_python(TOOLS)
    assert {t["function"]["name"] for t in TOOLS} == set(TOOL_PROFILES)


def test_an_unknown_workload_is_a_clear_error():
    with pytest.raises(ConfigError, match="unknown workload 'poetry'"):
        make_task("poetry", 0, 0, DEFAULT_SLOS)
