"""`specrelay chaos`: start the Redis topology of compose.yaml as local processes, inject one fault per scenario
(kill -9 the drafter, a verifier, the kvstore; restart Redis; requests longer than the claim timeout; poison
inputs) with requests in flight, and print per fault what a user would see: requests failed / completed, outputs
equal to the target's greedy reference, duplicated tokens, seconds to recover. Exits 1 if any acceptance criterion
of issue 18 is missed.

Modules: chaos_topology (the processes), chaos_client (one streamed request), chaos_check (the greedy reference
and the comparison), chaos_faults (the scenarios).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

from specrelay.models.resolve import PAIR_DIR
from specrelay.shared.errors import SpecrelayError

DEFAULT_FAULTS = ("drafter", "verifier", "kvstore", "redis", "long", "poison")
# Prompts in the shape the embedded pair was trained on (chat turns), so each continuation is its own text.
QUESTIONS = (
    "What is 17 * 23? Show the working.",
    "Describe a user record with name Ada, age 36 and city Paris as compact JSON.",
    "Write a Python function that reverses a list.",
    "Plan the steps to book a flight from Oslo to Rome next Friday.",
    "What is the weather like in Tokyo today?",
    "Convert 250 US dollars to euros.",
    "Remind me to call Sam at 5 pm.",
    "Summarise what a reviewer should check in a pull request.",
)
LONG_PROMPT = "1, 2, 3, 4,"  # issue 18's long request: it keeps counting
PROBE_QUESTION = "Hi"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=str(PAIR_DIR / "target"),
                        help="the target: a directory, a .gguf file or a built-in model (default: the small trained "
                             "pair's target, which greedy decoding on this CPU runs in seconds)")
    parser.add_argument("--draft", default=None, help="draft model (default: the pair's draft for the pair's target; "
                        "else none, and the drafter proposes by Token Recycling)")
    parser.add_argument("--faults", default=",".join(DEFAULT_FAULTS),
                        help=f"comma-separated scenarios to run after the baseline (default: all: "
                             f"{','.join(DEFAULT_FAULTS)})")
    parser.add_argument("--quick", action="store_true", help="fewer and shorter requests (the test suite's run)")
    parser.add_argument("--requests", type=int, default=None, help="requests in flight per fault (default 6; "
                        "--quick 3)")
    parser.add_argument("--max-tokens", type=int, default=None, help="tokens per request (default 96; --quick 32)")
    parser.add_argument("--long-requests", type=int, default=None, help="long requests at once (default 2; "
                        "--quick 1)")
    parser.add_argument("--long-tokens", type=int, default=None,
                        help="tokens per long request (default 2000); it must outlast the claim timeout")
    parser.add_argument("--claim-timeout-s", type=float, default=10.0,
                        help="each verifier's --claim-idle-s: a Generate whose replica stopped renewing its claim "
                             "this long is taken over by another (default 10, a third of the verifiers' own 30, so "
                             "a 2,000-token request outlasts it on a fast CPU too: 16 s there)")
    parser.add_argument("--verifiers", type=int, default=2, help="verifier replicas (default 2)")
    parser.add_argument("--request-timeout-s", type=float, default=180.0,
                        help="a request still open this long counts as hung (default 180)")
    parser.add_argument("--redis-down-s", type=float, default=1.0, help="how long Redis stays down (default 1)")
    parser.add_argument("--recover-within-s", type=float, default=10.0,
                        help="after the Redis restart every service and a fresh request must work within this "
                             "(default 10)")
    parser.add_argument("--settle-timeout-s", type=float, default=120.0,
                        help="how long to wait for recovery after a fault before calling it lost (default 120)")
    parser.add_argument("--startup-timeout-s", type=float, default=300.0, help="for the stack to start")
    parser.add_argument("--json", type=Path, default=None, metavar="FILE", help="write every figure here")
    parser.add_argument("--log-dir", type=Path, default=None,
                        help="where each process logs (default: a temporary folder, kept if a criterion fails)")


def main(args: argparse.Namespace) -> int:
    from specrelay.loadgen.chaos_faults import SCENARIOS

    faults = [f.strip() for f in args.faults.split(",") if f.strip()]
    unknown = [f for f in faults if f not in SCENARIOS]
    if unknown:
        raise SpecrelayError(f"unknown fault(s) {', '.join(unknown)}; choose from {', '.join(SCENARIOS)}")
    for flag in ("requests", "max_tokens", "long_requests", "long_tokens", "verifiers"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise SpecrelayError(f"--{flag.replace('_', '-')} must be at least 1")
    for flag in ("claim_timeout_s", "request_timeout_s", "recover_within_s", "settle_timeout_s", "startup_timeout_s"):
        value = getattr(args, flag)
        if value is not None and not value > 0:
            raise SpecrelayError(f"--{flag.replace('_', '-')} must be positive")
    if args.redis_down_s < 0:
        raise SpecrelayError("--redis-down-s must be 0 or more")
    if args.verifiers < 2 and "verifier" in faults:
        raise SpecrelayError("the verifier kill needs --verifiers 2 or more (one must survive)")
    from specrelay.models.resolve import choose_proposer, resolve_model

    args.model_dir = resolve_model(args.model)  # a .gguf or built-in model: imported once, here, for every service
    args.proposer, args.draft_dir = choose_proposer(args.model_dir, args.draft, None)
    keep = args.log_dir is not None
    log_dir = args.log_dir or Path(tempfile.mkdtemp(prefix="specrelay-chaos-"))
    log_dir.mkdir(parents=True, exist_ok=True)
    report = asyncio.run(run(args, faults, log_dir))
    print_table(report["scenarios"])
    if args.json is not None:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    failed = [s for s in report["scenarios"] if not s["passed"]]
    for s in failed:
        for why in s["failures"]:
            print(f"FAIL {s['name']}: {why}", file=sys.stderr)
    if failed:
        print(f"specrelay chaos: {len(failed)} of {len(report['scenarios'])} scenarios missed a criterion; "
              f"process logs in {log_dir}", file=sys.stderr)
        return 1
    if not keep:
        shutil.rmtree(log_dir, ignore_errors=True)
    print("specrelay chaos: every criterion met")
    return 0


def plan_from(args: argparse.Namespace):
    from specrelay.loadgen.chaos_faults import Plan
    from specrelay.shared.bus import BusConfig

    quick = args.quick
    return Plan(num_requests=args.requests or (3 if quick else 6), max_tokens=args.max_tokens or (32 if quick else 96),
                long_requests=args.long_requests or (1 if quick else 2), long_tokens=args.long_tokens or 2000,
                request_timeout_s=args.request_timeout_s, redis_down_s=args.redis_down_s,
                recover_within_s=args.recover_within_s, settle_timeout_s=args.settle_timeout_s,
                claim_timeout_s=args.claim_timeout_s or BusConfig().min_idle_ms / 1000)


async def run(args: argparse.Namespace, faults: list[str], log_dir: Path) -> dict:
    import aiohttp

    from specrelay.loadgen import chaos_faults as F
    from specrelay.loadgen import chaos_topology as T
    from specrelay.loadgen.chaos_check import greedy_references
    from specrelay.services.gateway.state import end_of_turn_ids
    from specrelay.shared.tokenizer import Tokenizer

    plan = plan_from(args)
    tokenizer = Tokenizer(args.model_dir)
    prompts = {f"p{i}": (chat_prompt(tokenizer, q), plan.max_tokens) for i, q in enumerate(QUESTIONS)}
    if plan.num_requests > len(prompts):
        raise SpecrelayError(f"--requests is at most {len(prompts)} (one per prompt)")
    prompts["probe"] = (chat_prompt(tokenizer, PROBE_QUESTION), F.PROBE_MAX_TOKENS)
    if "long" in faults:  # issue 18's repro: the same long request several times at once
        prompts["long"] = (tokenizer.encode(LONG_PROMPT, True), plan.long_tokens)
    redis_port = T.free_port()
    redis_url = f"redis://127.0.0.1:{redis_port}/0"
    draft = None if args.draft_dir is None else str(args.draft_dir)
    specs = T.services(redis_url, str(args.model_dir), draft, proposer=args.proposer, num_verifiers=args.verifiers,
                       verifier_args=() if args.claim_timeout_s is None else
                       ("--claim-idle-s", f"{args.claim_timeout_s:g}"))
    decode = lambda ids: tokenizer.decode(ids, skip_special_tokens=True)  # noqa: E731 - as the gateway streams
    t0 = time.monotonic()
    # side by side: the references decode in this process while the services load their models
    starting = asyncio.create_task(asyncio.to_thread(T.start_stack, specs, redis_port, log_dir, args.startup_timeout_s))
    try:
        references = dict(zip(prompts, await asyncio.to_thread(
            greedy_references, args.model_dir, list(prompts.values()), end_of_turn_ids(tokenizer), decode)))
    except BaseException:
        with contextlib.suppress(Exception):
            await asyncio.to_thread((await starting).stop)
        raise
    print(f"greedy references for {len(references)} prompts in {time.monotonic() - t0:.1f}s", flush=True)
    stack = await starting
    print(f"stack ready in {time.monotonic() - t0:.1f}s: {', '.join(s.name for s in specs)} on Redis {redis_url}; "
          f"logs in {log_dir}", flush=True)
    supervisor = asyncio.create_task(stack.supervise())
    results = []
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None)) as session:
            ctx = F.Context(stack, session, args.model_dir.resolve().name, references, tokenizer, plan)
            for scenario in [F.baseline] + [F.SCENARIOS[f] for f in faults]:
                t0 = time.monotonic()
                result = await scenario(ctx)
                results.append(result)
                print(f"{result.name} ({result.fault}): {'ok' if not result.failures else 'FAILED'} in "
                      f"{time.monotonic() - t0:.1f}s", flush=True)
                await settle(stack, plan.settle_timeout_s)
    finally:
        supervisor.cancel()
        await asyncio.to_thread(stack.stop)
    return {"model": args.model_dir.name, "draft": args.draft_dir and args.draft_dir.name, "proposer": args.proposer,
            "verifiers": args.verifiers,
            "plan": vars(plan),
            "scenarios": [r.as_json() for r in results]}


def chat_prompt(tokenizer, question: str) -> list[int]:
    return tokenizer.apply_chat_template([{"role": "user", "content": question}])


async def settle(stack, timeout_s: float) -> None:
    """Before the next fault: every service ready again, so one scenario's damage is not charged to the next."""
    from specrelay.loadgen.chaos_faults import until_ready

    seconds, waiting = await until_ready(stack, time.monotonic(), timeout_s)
    if seconds is None:
        print(f"not ready after {timeout_s:g}s, going on: {', '.join(waiting)}", flush=True)


def print_table(scenarios: list[dict]) -> None:
    header = ("fault", "sent", "completed", "failed", "hung", "4xx", "equal to reference", "duplicated tokens",
              "recover s", "all ready s", "crashes", "result")
    rows = []
    for s in scenarios:
        rows.append((s["name"], s["sent"], s["completed"], s["failed"], s["hung"], s["refused"],
                     f"{s['equal_to_reference']}/{s['completed']}", s["duplicated_tokens"], _seconds(s["recover_s"]),
                     _seconds(s["ready_s"]), len(s["crashes"]), "pass" if s["passed"] else "FAIL"))
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    print("| " + " | ".join(str(h).ljust(w) for h, w in zip(header, widths)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for row in rows:
        print("| " + " | ".join(str(x).ljust(w) for x, w in zip(row, widths)) + " |")


def _seconds(value: float | None) -> str:
    return "never" if value is None else f"{value:.1f}"
