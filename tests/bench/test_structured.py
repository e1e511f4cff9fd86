"""`specrelay bench structured` on the small pair: every check runs and is judged the way the README reports it
(the pair's grammar-forced replies are always valid, greedy is equal with and without speculation), and the judge
refuses what a client would refuse. Never a time."""

from __future__ import annotations

import argparse
import json
from types import SimpleNamespace

import pytest

from specrelay.bench.structured import Workload, add_arguments, forced_call, judge_call, judge_json, main
from specrelay.models.resolve import PAIR_DIR

TARGET = PAIR_DIR / "target"  # the bench's default is the real model, too slow for the suite
pytestmark = pytest.mark.skipif(not (TARGET / "config.json").is_file(), reason="embedded target not built")


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> dict:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    out = tmp_path_factory.mktemp("structured") / "structured.json"
    args = parser.parse_args(["--model", str(TARGET), "--num-calls", "12", "--num-json", "6", "--num-greedy", "6",
                              "--max-tokens", "48,64", "--json", str(out)])
    assert main(args) == 0  # every goal met on the pair
    return json.loads(out.read_text())


def test_the_report_has_every_check_at_every_budget(report):
    assert report["proposer"] == "tree" and [r["max_tokens"] for r in report["sampled"]] == [48, 64]
    for run in report["sampled"]:
        assert (run["calls"]["valid"], run["calls"]["of"]) == (12, 12)
        assert run["calls"]["valid_parallel_allowed"] == "6/6" and run["calls"]["valid_parallel_false"] == "6/6"
        assert run["calls"]["invalid"] == []
        assert (run["json_schema"]["valid"], run["json_schema"]["of"]) == (6, 6)
    assert (report["greedy"]["equal"], report["greedy"]["of"], report["greedy"]["max_tokens"]) == (6, 6, 64)
    assert set(report["goals"]) == {"forced_calls_valid_max_tokens_48", "json_schema_valid_max_tokens_48",
                                    "forced_calls_valid_max_tokens_64", "json_schema_valid_max_tokens_64",
                                    "greedy_equal_with_and_without_speculation"}


def _request(workload: Workload, text: str, finish: str = "stop"):
    output = workload.tokenizer.encode(text) + ([workload.stop[0]] if finish == "stop" else [])
    return SimpleNamespace(output=output, finish_reason=finish)


def test_the_judge_refuses_what_a_client_would():
    workload = Workload(TARGET)
    call = '{"city": "Oslo", "unit": "celsius"}}\n</tool_call>'
    assert forced_call(1)[:2] == ("get_weather", False)
    assert judge_call(workload, 1, _request(workload, call)) == (True, False, "")
    assert not judge_call(workload, 1, _request(workload, '{"city": "Oslo"}}\n</tool_call>'))[0]  # unit missing
    assert not judge_call(workload, 1, _request(workload, f"{call}\n<tool_call>\n{{\"name\": \"get_weather\", "
                                                          f"\"arguments\": {call}"))[0]  # two calls, parallel false
    cut = _request(workload, '{"city": "Os', "length")
    assert judge_call(workload, 1, cut) == (False, True, "no complete call (the first was cut by max_tokens)")
    answer = '{"city": "Oslo", "temperature": 3, "sunny": false}'
    assert judge_json(workload, _request(workload, answer))
    assert not judge_json(workload, _request(workload, answer[:-1], "length"))
    assert not judge_json(workload, _request(workload, answer.replace("3", "99")))  # above the schema's maximum
