"""`specrelay bench relay`: relayed decode-phase KV in planner -> worker -> reviewer pipelines, side by side.

For each span length, each pipeline's worker and reviewer prefills are run five ways on the same prompt: a full
prefill (the runtime's one-pass prefill), naive reuse (every relayed K/V kept), EPIC (naive, but the first 16
tokens of each span recomputed), CacheBlend (top-r% by value deviation at layer 1) and RelayCaching (deviation ≥
α·mean ∪ influence ≥ β·mean, checked over the band chosen from the model's layer profile: relay_profile.py). Then
the task check (relay_task.py): questions answered from a quoted records list, right or wrong. TTFT is the downstream
prefill's wall time in this process: for the reuse methods it includes finding the quotes in the kvstore, loading
and re-rotating their K/V, and the selective recompute.

Quality is judged against the full prefill on the downstream agent's answer: `greedy_agreement` is the share of
the next 64 greedy tokens equal position by position (`greedy_exact`: all 64; `first_token_agreement`: the first
token, the one the relayed prefill alone decides), `mean_kl` the mean KL(full ‖ method)
of the next-token distributions along the full prefill's answer (teacher-forced, so one early flip does not count
64 times). Where two answers part, `diverged_at_near_tie` counts the partings at which the full prefill itself was
torn (top-2 probability margin < 0.01): there any perturbation, however small, picks the other token.
"""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path

from specrelay.bench.report import finish_report

DEFAULT_MODEL = "smollm2-135m-instruct"  # the default served model (models/resolve.py); the small pair: models/target
SPANS = (256, 512, 1024, 2048)
QUICK_SPANS = (256, 512)
NEAR_TIE = 0.01  # full prefill's top-2 probability margin under which either greedy choice is a coin flip


def add_relay_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", type=Path, default=Path(DEFAULT_MODEL), help="a model directory, a .gguf file "
                        f"or a built-in model (default: {DEFAULT_MODEL}; the small pair: models/target)")
    parser.add_argument("--quick", action="store_true", help=f"spans {QUICK_SPANS}, one pipeline, one timing run")
    parser.add_argument("--json", type=Path, default=None, metavar="FILE", help="write the results here")
    parser.add_argument("--spans", type=str, default=None, help="planner output lengths in tokens, comma-separated "
                        f"(default {','.join(map(str, SPANS))}); the worker writes half as many")
    parser.add_argument("--pipelines", type=int, default=None, help="pipelines per span length (default 3)")
    parser.add_argument("--repeats", type=int, default=None,
                        help="timed runs per prefill, methods interleaved, median kept (default 5)")
    parser.add_argument("--recompute-ratio", type=float, default=0.15,
                        help="CacheBlend's r, and RelayCaching's with --select top (default 0.15)")
    parser.add_argument("--deviation-factor", type=float, default=2.0, help="RelayCaching's α (default 2.0)")
    parser.add_argument("--influence-factor", type=float, default=2.5, help="RelayCaching's β (default 2.5)")
    parser.add_argument("--influence-from", choices=("prompt", "span"), default="prompt",
                        help="RelayCaching's influence: attention from the prompt's last tokens, or each span's")
    parser.add_argument("--influence-layers", choices=("check", "all"), default="check",
                        help="RelayCaching's influence: at the check layers, or summed over all layers (a probe pass)")
    parser.add_argument("--select", choices=("threshold", "top"), default="threshold",
                        help="RelayCaching's influence rule: ≥ β·mean, or the top --recompute-ratio share")
    parser.add_argument("--select-ratio", type=float, default=None,
                        help="RelayCaching's share with --select top (default: --recompute-ratio)")
    parser.add_argument("--check-layers", type=str, default="auto",
                        help="RelayCaching's check layers, comma-separated, or auto (default): the band chosen from "
                             "the model's layer profile (cached; measured first if missing)")
    parser.add_argument("--cacheblend-check-layers", type=str, default="1",
                        help="CacheBlend's check layers (default 1, as its paper)")
    parser.add_argument("--recompute-first", type=int, default=None,
                        help="RelayCaching also recomputes the first N tokens of each span (EPIC's rule; default: "
                             "what the layer profile chose with --check-layers auto, else 0)")
    parser.add_argument("--epic-tokens", type=int, default=16, help="EPIC's recomputed span head (default 16)")
    parser.add_argument("--task-questions", type=int, default=None,
                        help="task check: questions per span length about a quoted records list (default 4, "
                             "--quick 2; 0 skips it)")
    parser.add_argument("--layer-profile", action="store_true",
                        help="only measure the per-layer deviation of relayed K/V (at --spans, --pipelines "
                             "prompts each), print it, cache the band it chooses for the model, write --json")
    parser.add_argument("--greedy-tokens", type=int, default=64, help="answer tokens compared, greedy and by KL "
                        "(default 64)")
    parser.add_argument("--device", default="cpu", help="torch device (default cpu)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--seed", type=int, default=0)


def main_relay(args: argparse.Namespace) -> int:
    import torch

    from specrelay.bench.relay_pipeline import run_pipeline
    from specrelay.bench.relay_task import run_task, task_scores
    from specrelay.models.resolve import BUILTIN_MODELS, resolve_model
    from specrelay.services.kvstore import make_store
    from specrelay.shared.errors import ConfigError

    if args.model.suffix == ".gguf" or str(args.model) in BUILTIN_MODELS:
        args.model = resolve_model(args.model)  # a .gguf file or a built-in model name
    spans, pipelines, repeats, questions = _sizes(args)
    if not (args.model / "config.json").is_file():
        raise ConfigError(f"{args.model}: no model there (train the embedded pair with `specrelay models train`, "
                          "or pass --model DIR)")
    if args.threads:
        torch.set_num_threads(args.threads)
    setup = _load(args, spans)
    runner, texts, banned, model_id = setup
    if args.layer_profile:
        return _layer_profile(args, setup, spans, pipelines)
    check, head = ((tuple(_ints(args.check_layers, "--check-layers")), 0) if args.check_layers != "auto"
                   else _band(args, setup))
    recompute_first = args.recompute_first if args.recompute_first is not None else head
    configs = _configs(args, check, recompute_first)
    model, cfg = runner.model, runner.model.config
    report = {"model": args.model.name, "device": str(model.device), "dtype": str(model.dtype).removeprefix("torch."),
              "num_layers": cfg.num_layers, "pipelines": pipelines, "repeats": repeats,
              "settings": {"recompute_ratio": args.recompute_ratio, "deviation_factor": args.deviation_factor,
                           "influence_factor": args.influence_factor, "influence_from": args.influence_from,
                           "influence_layers": args.influence_layers, "select": args.select,
                           "select_ratio": args.select_ratio,
                           "check_layers": list(check), "recompute_first": recompute_first,
                           "cacheblend_check_layers": list(configs["cacheblend"].check_layers),
                           "epic_tokens": args.epic_tokens, "greedy_tokens": args.greedy_tokens,
                           "task_questions": questions},
              "spans": {}}
    for span_len in spans:
        store = make_store(None, 4 << 30)
        rows = []
        for p in range(pipelines):
            rows += asyncio.run(run_pipeline(runner, store, model_id, texts, span_len,
                                             args.seed * 1000 + p, configs, args.greedy_tokens, repeats, banned))
        report["spans"][str(span_len)] = {"num_prompts": len(rows), "methods": _aggregate(rows)}
        if questions:
            answers = asyncio.run(run_task(runner, store, model_id, texts, span_len, args.seed + span_len, configs,
                                           questions))
            for method, row in task_scores(answers).items():
                report["spans"][str(span_len)]["methods"][method].update(row)
        print(_table(span_len, report["spans"][str(span_len)]["methods"]), flush=True)
    report["goals"] = _goals(report["spans"])
    finish_report(report, args.json)
    return 0


def _sizes(args: argparse.Namespace) -> tuple[list[int], int, int, int]:
    """(span lengths, pipelines, repeats, task questions) from the flags, --quick's smaller defaults."""
    from specrelay.shared.errors import ConfigError

    spans = _ints(args.spans, "--spans") if args.spans else (QUICK_SPANS if args.quick else SPANS)
    pipelines = args.pipelines if args.pipelines is not None else (1 if args.quick else 3)
    repeats = args.repeats if args.repeats is not None else (1 if args.quick else 5)
    if pipelines < 1 or repeats < 1 or args.greedy_tokens < 1:
        raise ConfigError("--pipelines, --repeats and --greedy-tokens must be positive")
    if (args.recompute_first or 0) < 0 or args.epic_tokens < 1 or (args.task_questions or 0) < 0:
        raise ConfigError("--recompute-first and --task-questions must be non-negative, --epic-tokens positive")
    questions = args.task_questions if args.task_questions is not None else (2 if args.quick else 4)
    return spans, pipelines, repeats, questions


def _configs(args: argparse.Namespace, check: tuple[int, ...], recompute_first: int) -> dict:
    """The methods side by side: method name -> RelayConfig."""
    from specrelay.services.verifier.relay import RelayConfig

    return {
        "naive_reuse": RelayConfig(method="naive"),
        "epic": RelayConfig(method="naive", recompute_first=args.epic_tokens),
        "cacheblend": RelayConfig(method="cacheblend", recompute_ratio=args.recompute_ratio,
                                  check_layers=tuple(_ints(args.cacheblend_check_layers, "--cacheblend-check-layers"))),
        "relaycaching": RelayConfig(method="relaycaching", deviation_factor=args.deviation_factor,
                                    influence_factor=args.influence_factor, influence_from=args.influence_from,
                                    influence_layers=args.influence_layers, select=args.select,
                                    recompute_ratio=(args.select_ratio if args.select_ratio is not None
                                                     else args.recompute_ratio),
                                    recompute_first=recompute_first, check_layers=check),
    }


def _load(args: argparse.Namespace, spans: list[int]):
    """(runner, texts, banned ids, model id) for the model of `args`, with room for the longest prompts."""
    from specrelay.bench.relay_pipeline import Texts
    from specrelay.services.verifier.prefix_cache import model_id
    from specrelay.shared.errors import ConfigError
    from specrelay.shared.modeling.loader import load_model
    from specrelay.shared.modeling.runner import ModelRunner

    model = load_model(args.model, device=args.device)
    cfg = model.config
    longest = max(spans) + max(spans) // 2 + 256
    if longest > cfg.max_model_len:
        raise ConfigError(f"--spans up to {max(spans)} make reviewer prompts of ~{longest} tokens, past the model's "
                          f"{cfg.max_model_len}")
    block_size = 16
    runner = ModelRunner(model, num_blocks=4 * (-(-(longest + args.greedy_tokens) // block_size)) + 8,
                         block_size=block_size, prefill_chunk=cfg.max_model_len)
    banned = sorted(set(cfg.eos_token_ids) | ({cfg.bos_token_id} if cfg.bos_token_id is not None else set()))
    texts = Texts(args.model, cfg.vocab_size, set(banned))
    if texts.tokenizer is not None:
        banned = sorted(set(banned) | set(texts.tokenizer.special_ids))
    return runner, texts, banned, model_id(args.model, model.dtype)


def _layer_profile(args: argparse.Namespace, setup, spans: list[int], pipelines: int) -> int:
    """--layer-profile: measure, print, cache the chosen band for the model, write --json."""
    import json

    from specrelay.bench import relay_layers
    from specrelay.services.verifier import relay_profile

    runner, texts, banned, model_id = setup
    profile = relay_layers.measure(runner, texts, spans, pipelines, args.seed, banned, args.model.name)
    print(profile.table(), flush=True)
    path = relay_profile.profile_path(model_id)
    relay_profile.save(profile, path)
    print(f"check layers {','.join(map(str, profile.check_layers))}, span head {profile.recompute_first} "
          f"(cached for {args.model.name})", flush=True)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(vars(profile) | {"command": "bench relay --layer-profile"}, indent=1) + "\n")
    return 0


def _band(args: argparse.Namespace, setup) -> tuple[tuple[int, ...], int]:
    """The model's cached band; measured now (one 256-token handoff) and cached when missing."""
    from specrelay.bench import relay_layers
    from specrelay.services.verifier import relay_profile

    runner, texts, banned, model_id = setup
    profile = relay_profile.load(relay_profile.profile_path(model_id))
    if profile is None:
        profile = relay_layers.measure(runner, texts, [256], 1, args.seed, banned, args.model.name)
        relay_profile.save(profile, relay_profile.profile_path(model_id))
        print(profile.table(), flush=True)
    return tuple(profile.check_layers), profile.recompute_first


def _aggregate(rows: list[dict]) -> dict[str, dict[str, float]]:
    from specrelay.bench.relay_pipeline import METHODS

    out = {}
    full_ms = sum(r["full_prefill"].ttft_ms for r in rows) / len(rows)
    for method in METHODS:
        ms = [r[method] for r in rows]
        ttft = sum(m.ttft_ms for m in ms) / len(ms)
        out[method] = {
            "reuse_rate": round(sum(m.reuse_rate for m in ms) / len(ms), 4),
            "ttft_ms": round(ttft, 2),
            "ttft_speedup": round(full_ms / ttft, 2),
            "greedy_agreement": round(sum(m.greedy_agreement for m in ms) / len(ms), 4),
            "greedy_exact": round(sum(m.greedy_exact for m in ms) / len(ms), 4),
            "first_token_agreement": round(sum(m.first_token_match for m in ms) / len(ms), 4),
            "mean_kl": round(sum(m.mean_kl for m in ms) / len(ms), 8),
            "diverged": sum(m.divergence_margin is not None for m in ms),
            "diverged_at_near_tie": sum(m.divergence_margin is not None and m.divergence_margin < NEAR_TIE
                                        for m in ms),
        }
    return out


def _goals(spans: dict[str, dict]) -> dict[str, bool]:
    """The issue's targets for RelayCaching: answers at every span length, reuse and TTFT at the longest."""
    rc = {k: s["methods"]["relaycaching"] for k, s in spans.items()}
    longest = rc[max(spans, key=int)]
    tasks = all("task_accuracy" in s["methods"]["relaycaching"] for s in spans.values())
    return {
        "greedy_agreement >= 0.95 (every span)": all(m["greedy_agreement"] >= 0.95 for m in rc.values()),
        "first_token_agreement = 1.0 (every span)": all(m["first_token_agreement"] == 1.0 for m in rc.values()),
        "task_accuracy = full prefill's (every span)": tasks and all(
            s["methods"]["relaycaching"]["task_accuracy"] >= s["methods"]["full_prefill"]["task_accuracy"]
            for s in spans.values()),
        "reuse_rate >= 0.8 (longest span)": longest["reuse_rate"] >= 0.8,
        "ttft_speedup >= 3 (longest span)": longest["ttft_speedup"] >= 3.0,
        "greedy_agreement above naive reuse and CacheBlend (every span)": all(
            s["methods"]["relaycaching"]["greedy_agreement"] > max(s["methods"]["naive_reuse"]["greedy_agreement"],
                                                                  s["methods"]["cacheblend"]["greedy_agreement"])
            for s in spans.values()),
    }


def _table(span_len: int, methods: dict[str, dict[str, float]]) -> str:
    lines = [f"relay span {span_len} tokens", f"  {'method':<14}{'reuse':>7}{'TTFT ms':>10}{'speedup':>9}"
             f"{'greedy':>8}{'exact':>7}{'first':>7}{'mean KL':>10}{'diverged (at tie)':>19}{'task':>7}{'same':>6}"]
    for name, m in methods.items():
        task = (f"{m['task_accuracy']:>7.2f}{m['task_same']:>6.2f}" if "task_accuracy" in m else "")
        lines.append(f"  {name:<14}{m['reuse_rate']:>7.2f}{m['ttft_ms']:>10.1f}{m['ttft_speedup']:>8.2f}x"
                     f"{m['greedy_agreement']:>8.3f}{m['greedy_exact']:>7.2f}{m['first_token_agreement']:>7.2f}"
                     f"{m['mean_kl']:>10.2e}"
                     f"{m['diverged']:>12} ({m['diverged_at_near_tie']}){task}")
    return "\n".join(lines)


def _ints(text: str, flag: str) -> list[int]:
    from specrelay.shared.errors import ConfigError

    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ConfigError(f"{flag}: expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 0:
        raise ConfigError(f"{flag}: expected non-negative integers, got {text!r}")
    return values
