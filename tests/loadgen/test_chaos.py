"""`specrelay chaos`: the stack it starts is compose.yaml's, the comparison with the greedy reference sees a
re-sent chunk, and a reduced run (`--quick`) over a real Redis meets issue 18's criteria as a user would read them
from its table and JSON: 0 failed requests when the drafter, a verifier or the kvstore is killed and for a request
longer than the claim timeout, every service back after a Redis restart with no request hung, poison inputs
answered or refused without killing anything, outputs equal to the greedy reference and 0 duplicated tokens.

The end-to-end tests (`quick_run`) fail on the code before issue 18's Redis fixes (6e73404: verifiers crash on a
request outlasting the claim timeout and on a Redis restart, after which every stream in flight hangs; a seed or
top_k past 64 bits is a 500) and pass with them.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import re
import sys
from pathlib import Path

import pytest

from specrelay.loadgen import chaos
from specrelay.loadgen.chaos_check import compare
from specrelay.loadgen.chaos_topology import services
from specrelay.shared.errors import SpecrelayError

ROOT = Path(__file__).resolve().parents[2]


def _load_live_servers():
    path = ROOT / "tests" / "services" / "gateway" / "live_servers.py"
    spec = importlib.util.spec_from_file_location("specrelay_tests_live_servers", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault(spec.name, module)
    spec.loader.exec_module(module)
    return module


class CharTokens:
    """One token per character: duplicated tokens are duplicated characters."""

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return [ord(c) for c in text]


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    chaos.add_arguments(parser)
    return parser.parse_args(list(argv))


# --- the stack is compose.yaml's -------------------------------------------------------------------------------

def _without_models_and_ports(args: tuple[str, ...] | list[str]) -> list[str]:
    out, skip = [], False
    for i, a in enumerate(args):
        if skip:
            skip = False
            continue
        if a in ("--model", "--draft"):
            skip = True
            continue
        out.append("PORT" if i and args[i - 1] == "--port" else a)
    return out


def test_the_chaos_stack_runs_compose_yamls_commands_with_the_model_asked_for():
    live_servers = _load_live_servers()
    url = "redis://127.0.0.1:6379/0"
    specs = services(url, "/m/target", "/m/draft", proposer="tree", num_verifiers=2)  # live_servers' pair
    compose = {c.service: c for c in live_servers.compose_commands(url)}
    declared = live_servers.compose_services()
    assert {s.service for s in specs} == set(compose)
    assert [s.name for s in specs if s.service == "verifier"] == ["verifier-1", "verifier-2"]
    for spec in specs:
        c = compose[spec.service]
        assert _without_models_and_ports(spec.args) == _without_models_and_ports(c.argv[1:]), spec.name
        assert spec.env == {k: c.env[k] for k in declared[spec.service].get("environment") or {}}, spec.name
        if spec.service in ("gateway", "verifier", "drafter"):
            assert spec.args[spec.args.index("--model") + 1] == "/m/target"
    drafter = next(s for s in specs if s.service == "drafter")
    assert drafter.args[drafter.args.index("--draft") + 1] == "/m/draft"


# --- the comparison --------------------------------------------------------------------------------------------

def test_a_stream_of_the_reference_is_equal_with_no_duplicates():
    c = compare(["1, ", "2, 1", ", 2, "], "1, 2, 1, 2, ", CharTokens())  # the reference repeats itself: no duplicate
    assert (c.equal, c.duplicated_tokens, c.diverged_at) == (True, 0, None)


def test_a_chunk_sent_twice_is_counted_as_duplicated_tokens():
    c = compare(["Hello", " wor", " wor", "ld"], "Hello world", CharTokens())
    assert not c.equal
    assert (c.duplicated_chunks, c.duplicated_tokens) == (1, 4)


def test_a_resent_tail_that_runs_on_into_new_text_is_a_duplicate():
    c = compare(["Hello", " wor", "or", "orld"], "Hello world", CharTokens())
    assert (c.duplicated_chunks, c.duplicated_tokens, c.diverged_at) == (2, 4, None)  # "or", then "or" of "orld"


def test_a_different_output_is_not_equal_and_says_where_it_went_its_own_way():
    c = compare(["Hello", " there"], "Hello world", CharTokens())
    assert (c.equal, c.duplicated_tokens, c.diverged_at) == (False, 0, 5)
    short = compare(["Hello"], "Hello world", CharTokens())  # cut short: a prefix, not equal
    assert (short.equal, short.diverged_at) == (False, None)


# --- the command's refusals ------------------------------------------------------------------------------------

@pytest.mark.parametrize("argv, message", [
    (["--faults", "drafter,meteor"], "unknown fault(s) meteor"),
    (["--verifiers", "1"], "needs --verifiers 2"),
    (["--requests", "0"], "--requests must be at least 1"),
    (["--model", "/nonexistent"], "--model /nonexistent: not a directory"),
    (["--claim-timeout-s", "0"], "--claim-timeout-s must be positive"),
])
def test_bad_arguments_are_refused_with_a_clear_message_before_anything_starts(argv, message):
    with pytest.raises(SpecrelayError, match=re.escape(message)):
        chaos.main(_args(*argv))


# --- a reduced run over Redis ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """One `specrelay chaos --quick` for the module: the exit status, the JSON report, what it printed."""
    out = tmp_path_factory.mktemp("chaos")
    argv = ["--quick", "--json", str(out / "chaos.json"), "--log-dir", str(out / "logs"),
            # generous for a loaded 2-core machine: the tests assert what happened, not how fast
            "--recover-within-s", "60", "--request-timeout-s", "150", "--settle-timeout-s", "90",
            # a short claim timeout, and a request that outlasts it on any machine (1,500 tokens in under 2 s would
            # be over 750 tokens/s on one stream; an idle 2-core machine decodes the pair at about 200): a
            # killed verifier's work moves in seconds, and the long request cannot end before it was at risk
            "--claim-timeout-s", "2", "--long-tokens", "1500"]
    rc = chaos.main(_args(*argv))
    report = json.loads((out / "chaos.json").read_text())
    return rc, {s["name"]: s for s in report["scenarios"]}


def _why(scenario: dict) -> str:
    return f"{scenario['name']}: " + "; ".join(scenario["failures"])


def test_the_quick_chaos_run_meets_every_criterion(quick_run):
    rc, scenarios = quick_run
    assert set(scenarios) == {"baseline", "drafter kill", "verifier kill", "kvstore kill", "redis restart",
                              "long request", "poison input"}
    assert [_why(s) for s in scenarios.values() if not s["passed"]] == []
    assert rc == 0


@pytest.mark.parametrize("name", ["baseline", "drafter kill", "verifier kill", "kvstore kill", "long request"])
def test_no_request_fails_when_a_service_is_killed_or_a_request_outlasts_the_claim_timeout(quick_run, name):
    s = quick_run[1][name]
    assert (s["failed"], s["hung"], s["crashes"]) == (0, 0, []), _why(s)
    assert s["completed"] == s["sent"] > 0


def test_a_redis_restart_hangs_no_request_and_every_service_comes_back_by_itself(quick_run):
    s = quick_run[1]["redis restart"]
    assert s["hung"] == 0, _why(s)
    assert s["crashes"] == [], _why(s)  # retried with backoff, not restarted by the supervisor
    assert s["ready_s"] is not None and s["recover_s"] is not None, _why(s)


def test_poison_inputs_are_answered_or_refused_and_the_requests_beside_them_complete(quick_run):
    s = quick_run[1]["poison input"]
    assert s["crashes"] == [], _why(s)
    for r in s["requests"]:
        assert r["status"] is not None and r["status"] < 500, r
        if r["label"].startswith("beside-"):
            assert r["ok"], r


def test_every_completed_output_is_the_greedy_reference_with_no_duplicated_token(quick_run):
    for s in quick_run[1].values():
        assert s["equal_to_reference"] == s["completed"], _why(s)
        assert s["duplicated_tokens"] == 0, _why(s)
