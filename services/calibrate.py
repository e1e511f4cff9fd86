"""`specrelay calibrate`: measure this model on this device and write the PTE profile the server loads.

Measured with the real ModelRunner (shared/pte.py defines the fit): prefill time against prompt length gives p, the
seconds per prefilled token; one decode step's time against the context length gives step(L) = a + b·L; then
γ = b/p and β = a/p. Each point is the median of a few runs after a warm-up, and the device is synchronised around
every timed call.

Which profile a verifier uses, and where this command caches it: shared/pte_profiles.py.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from specrelay.shared.errors import ConfigError
from specrelay.shared.pte import PteProfile, measure_profile
from specrelay.shared.pte_profiles import profile_path

FULL_LENGTHS = (64, 128, 256, 512, 1024, 2048)
QUICK_LENGTHS = (32, 128, 256, 512)


def calibrate(runner, prompt_lengths, context_lengths, repeats: int = 3, device: str = "cpu",
              model: str = "unknown") -> PteProfile:
    """Time prefill and decode steps on `runner` (a ModelRunner) and fit the profile."""
    import torch

    from specrelay.shared.modeling.kv_cache import BlockTable
    from specrelay.shared.modeling.runner import StepInput

    vocab = runner.model.config.vocab_size
    gen = torch.Generator().manual_seed(0)
    sync = torch.cuda.synchronize if runner.model.device.type == "cuda" else (lambda: None)

    def tokens(n: int) -> list[int]:
        return torch.randint(0, vocab, (n,), generator=gen).tolist()

    @torch.inference_mode()
    def prefill_s(n: int) -> float:
        table, ids = BlockTable(), tokens(n)
        sync()
        t0 = time.perf_counter()
        runner.prefill(table, ids)
        sync()
        elapsed = time.perf_counter() - t0
        runner.release(table)
        return elapsed

    contexts: dict[int, BlockTable] = {}

    @torch.inference_mode()
    def decode_step_s(length: int) -> float:
        if length not in contexts:  # the context is built once per length, outside the timing
            contexts[length] = BlockTable()
            runner.prefill(contexts[length], tokens(length))
        table = contexts[length]
        sync()
        t0 = time.perf_counter()
        runner.forward([StepInput(table, tokens(1))])
        sync()
        elapsed = time.perf_counter() - t0
        runner.cache.truncate(table, length)
        return elapsed

    prefill_s(min(prompt_lengths))  # warm-up: first calls pay for allocation and kernel selection
    try:
        return measure_profile(prefill_s, decode_step_s, prompt_lengths, context_lengths, repeats,
                               device=device, model=model)
    finally:
        for table in contexts.values():
            runner.release(table)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from specrelay.models.resolve import add_model_argument
    from specrelay.shared.flags import add_device_argument

    add_model_argument(parser, "the model to profile (the one you serve)")
    add_device_argument(parser)
    parser.add_argument("--out", default=None, metavar="FILE",
                        help="where to write the profile (default: the cache the server reads, see --help text)")
    parser.add_argument("--quick", action="store_true", help=f"lengths {QUICK_LENGTHS}, 2 runs each")
    parser.add_argument("--if-missing", action="store_true",
                        help="do nothing when the output profile exists already (`make serve` calibrates once)")
    parser.add_argument("--lengths", default=None, metavar="N,N,...",
                        help=f"prompt and context lengths to measure (default {FULL_LENGTHS})")
    parser.add_argument("--repeats", type=int, default=None, help="runs per point, the median is kept (default 3)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's); measure with what the server will run with")


def _lengths(text: str | None, default: tuple[int, ...], limit: int) -> list[int]:
    if text is None:
        lengths = [n for n in default if n < limit]
    else:
        try:
            lengths = sorted({int(n) for n in text.split(",") if n.strip()})
        except ValueError:
            raise ConfigError(f"--lengths {text!r}: expected integers separated by commas") from None
        if any(n < 1 or n >= limit for n in lengths):
            raise ConfigError(f"--lengths: each length must be in [1, {limit - 1}] for this model")
    if len(lengths) < 2:
        raise ConfigError("calibration needs at least two lengths")
    return lengths


def main(args: argparse.Namespace) -> int:
    import torch

    from specrelay.models.resolve import resolve_model
    from specrelay.shared.modeling.loader import load_model
    from specrelay.shared.modeling.runner import ModelRunner

    model_dir = resolve_model(args.model)
    repeats = args.repeats if args.repeats is not None else (2 if args.quick else 3)
    if repeats < 1:
        raise ConfigError("--repeats must be at least 1")
    if args.threads is not None:
        if args.threads < 1:
            raise ConfigError("--threads must be at least 1")
        torch.set_num_threads(args.threads)
    out = Path(args.out) if args.out else profile_path(model_dir, args.device)
    if args.if_missing and out.is_file():
        print(f"{out} exists; not measuring again (run without --if-missing to)")
        return 0
    model = load_model(model_dir, device=args.device)
    limit = model.config.max_model_len
    lengths = _lengths(args.lengths, QUICK_LENGTHS if args.quick else FULL_LENGTHS, limit)
    block_size = 16
    num_blocks = 2 * sum(-(-(n + 1) // block_size) for n in lengths) + 8  # every decode context stays resident
    runner = ModelRunner(model, num_blocks=num_blocks, block_size=block_size)
    profile = calibrate(runner, lengths, lengths, repeats, device=args.device, model=model_dir.resolve().name)
    out.parent.mkdir(parents=True, exist_ok=True)
    profile.save(out)
    print(f"prefill: {profile.prefill_s_per_token * 1e6:.2f} us/token; decode step: "
          f"{profile.decode_a_s * 1e3:.3f} ms + {profile.decode_b_s_per_ctx_token * 1e9:.2f} ns x context")
    print(f"gamma = {profile.gamma:.6g}  beta = {profile.beta:.6g}  (prefill-token equivalents)")
    print(f"wrote {out}")
    return 0
