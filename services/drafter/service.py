"""The drafter service: proposers behind the bus.

Loop: receive a DraftBatch -> grow one tree per request (one batched proposer call) -> reply DraftReply;
DraftFeedback messages roll the draft KV back to what the target accepted and feed Token Recycling.

A DraftBatch older than `max_batch_age_s` is acknowledged undrafted: its verifier stopped waiting for it after
`--draft-timeout-s` (half a second), so a restarted drafter, or one that takes over a dead one's backlog, answers
what is asked now instead of working through seconds of drafts nobody reads. The bus being away is retried.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import logging
import os
import socket
import time
from dataclasses import dataclass, replace

import torch

from specrelay.services.drafter.base import DraftInput, Proposer, Verified
from specrelay.services.drafter.grammar import DraftGrammars
from specrelay.shared.bus import Bus, BusUnavailable, make_bus
from specrelay.shared.draft_tree import DraftTree
from specrelay.shared.messages import DRAFT_STREAM, DraftBatch, DraftFeedback, DraftReply, TreeMsg
from specrelay.shared.sampling import make_generator
from specrelay.shared.sampling_wire import params_from_spec
from specrelay.shared.stopping import leave, serve_until_stopped
from specrelay.shared.wire import WireTensor

log = logging.getLogger(__name__)
PROPOSERS = ("tree", "chain", "recycle", "suffix", "head", "hybrid")


@dataclass(frozen=True)
class DrafterConfig:
    model_dir: str  # the target: Token Recycling needs its vocabulary size only
    draft_dir: str | None  # None: no draft model (Token Recycling)
    proposer: str = "tree"
    redis: str | None = None
    consumer: str = f"drafter-{socket.gethostname()}-{os.getpid()}"  # pid 1 in every container
    num_blocks: int = 2048
    device: str = "cpu"
    max_batch_age_s: float = 5.0  # a DraftBatch published longer ago than this is dropped undrafted

    def __post_init__(self) -> None:
        from specrelay.shared.errors import ConfigError

        if self.proposer not in PROPOSERS:
            raise ConfigError(f"drafter: proposer {self.proposer!r} is not one of {', '.join(PROPOSERS)}")
        if not self.max_batch_age_s > 0:
            raise ConfigError(f"--max-batch-age-s {self.max_batch_age_s}: must be positive")
        if isinstance(self.num_blocks, bool) or not isinstance(self.num_blocks, int) or self.num_blocks < 1:
            raise ConfigError(f"drafter: num_blocks={self.num_blocks!r} must be a whole number ≥ 1")


def build_proposer(cfg: DrafterConfig) -> Proposer:
    from pathlib import Path

    from specrelay.models.resolve import check_same_vocabulary
    from specrelay.services.drafter.draft_model import DraftModelProposer
    from specrelay.services.drafter.recycling import TokenRecyclingProposer
    from specrelay.shared.errors import ConfigError
    from specrelay.shared.modeling.config import ModelConfig
    from specrelay.shared.modeling.loader import load_model
    from specrelay.shared.modeling.runner import ModelRunner

    if cfg.proposer == "recycle":
        return TokenRecyclingProposer(ModelConfig.from_dir(cfg.model_dir).vocab_size)
    if cfg.proposer == "suffix":
        from specrelay.services.drafter.suffix import SuffixProposer

        return SuffixProposer(ModelConfig.from_dir(cfg.model_dir).vocab_size)
    if cfg.proposer in ("head", "hybrid"):
        return build_head_proposer(cfg.proposer, Path(cfg.model_dir))
    if cfg.draft_dir is None:
        raise ConfigError(f"--proposer {cfg.proposer} needs a draft model (--draft)")
    check_same_vocabulary(Path(cfg.model_dir), Path(cfg.draft_dir))
    runner = ModelRunner(load_model(cfg.draft_dir, device=cfg.device), num_blocks=cfg.num_blocks)
    if cfg.proposer == "chain":
        return DraftModelProposer.chain(runner)
    return DraftModelProposer(runner)


def draft_grammars(model_dir: str) -> DraftGrammars:
    """Structured outputs: grammar states over the target's tokenizer, sized to its vocabulary."""
    from specrelay.shared.modeling.config import ModelConfig

    return DraftGrammars.for_model(model_dir, ModelConfig.from_dir(model_dir).vocab_size)


def build_head_proposer(kind: str, model_dir) -> Proposer:
    """The draft head shipped for the model (`head`), or it with suffix decoding (`hybrid`)."""
    from specrelay.models.resolve import default_head
    from specrelay.services.drafter.head import HeadProposer
    from specrelay.services.drafter.hybrid import HybridProposer
    from specrelay.services.drafter.suffix import SuffixProposer
    from specrelay.shared.errors import ConfigError
    from specrelay.shared.modeling.draft_head import DraftHead

    head_dir = default_head(model_dir)
    if head_dir is None:
        raise ConfigError(f"--proposer {kind}: no draft head ships for {model_dir.name}")
    head = HeadProposer(DraftHead.load(head_dir, model_dir))
    return head if kind == "head" else HybridProposer(SuffixProposer(head.vocab_size), head)


class Drafter:
    """Maps the bus's string request ids onto a proposer's integer ones and keeps per-request generators."""

    def __init__(self, proposer: Proposer, grammars: DraftGrammars | None = None):
        """grammars: the constrained requests' grammar states, to mask their proposals (None: unmasked)."""
        self.proposer = proposer
        self.grammars = grammars
        self.ids: dict[str, int] = {}
        self._next_id = itertools.count()  # never reused: len(self.ids) would repeat a live id after a release
        self.generators: dict[str, torch.Generator | None] = {}

    def draft(self, batch: DraftBatch) -> DraftReply:
        inputs = []
        for item in batch.items:
            if (rid := self.ids.get(item.request_id)) is None:
                rid = self.ids[item.request_id] = next(self._next_id)
            params = params_from_spec(item.sampling)
            if item.request_id not in self.generators:  # a stream of its own, independent of the verifier's
                seeded = None if params.seed is None else replace(params, seed=(params.seed * 1_000_003 + 7) % 2**63)
                self.generators[item.request_id] = make_generator(seeded or params)
            gen = self.generators[item.request_id]
            grammar = self.grammars.state(item) if self.grammars is not None else None
            inputs.append(DraftInput(rid, item.tokens, params, item.max_nodes, gen, item.num_prompt_tokens, grammar,
                                     positional_seed=item.positional_seed))
        trees = self.proposer.propose(inputs)
        return DraftReply(batch.step_id, [
            TreeMsg(item.request_id, t.tokens, t.parents, t.draft_probs,
                    None if t.q is None or item.positional_seed is not None  # verified without q
                    else WireTensor.from_torch(t.q.float().contiguous()), t.sources)
            for item, t in zip(batch.items, trees)], wants_hidden=getattr(self.proposer, "wants_hidden", False))

    def feedback(self, msg: DraftFeedback) -> None:
        verified = []
        for item in msg.items:
            if item.request_id not in self.ids:
                continue
            tree = DraftTree(item.tree_tokens, [-1] * len(item.tree_tokens), [1.0] * len(item.tree_tokens))
            hidden = None if item.hidden is None else item.hidden.to_torch(copy=True).float()
            verified.append(Verified(self.ids[item.request_id], tree, item.target_topk.to_torch(copy=True),
                                     item.accepted_nodes, hidden))
        self.proposer.observe(verified)
        for rid in msg.released:
            if rid in self.ids:
                self.proposer.release(self.ids.pop(rid))
                self.generators.pop(rid, None)
                if self.grammars is not None:
                    self.grammars.release(rid)


async def serve_drafter(bus: Bus, drafter: Drafter, consumer: str, max_batch_age_s: float = 5.0) -> None:
    try:
        await _serve(bus, drafter, consumer, max_batch_age_s)
    finally:
        await leave(bus, DRAFT_STREAM, "drafter", consumer)


async def _serve(bus: Bus, drafter: Drafter, consumer: str, max_batch_age_s: float) -> None:
    skipped = 0
    async for delivery in bus.consume(DRAFT_STREAM, "drafter", consumer, DraftBatch | DraftFeedback):
        msg = delivery.msg
        try:
            if isinstance(msg, DraftBatch):
                if time.time_ns() - delivery.published_ns > max_batch_age_s * 1e9:
                    skipped += 1
                    if skipped == 1 or skipped % 1000 == 0:
                        log.info("drafter: %d stale draft batch(es) dropped undrafted", skipped)
                else:
                    reply = await asyncio.to_thread(drafter.draft, msg)
                    await bus.reply(msg.reply_to, reply)
            else:  # cheap, and it frees what finished requests held
                await asyncio.to_thread(drafter.feedback, msg)
        except BusUnavailable as e:  # the verifier decodes without this draft meanwhile
            log.warning("drafter: %s", e)
        except Exception:  # a bad batch must not stop drafting for everyone: the verifier times out and decodes
            log.exception("draft failed")
        await delivery.ack()


def add_draft_arguments(parser: argparse.ArgumentParser, plain_decoding: bool = False) -> None:
    """--draft and --proposer, for `specrelay drafter` and `specrelay serve` (which may also decode plainly)."""
    parser.add_argument("--draft", default=None, help="draft model: a directory or a .gguf file with the target's "
                        "vocabulary (default: the small pair's draft when --model is its target, else none)")
    parser.add_argument("--proposer", choices=(*PROPOSERS, "none") if plain_decoding else PROPOSERS, default=None,
                        help="draft-model tree, chain, model-free Token Recycling or suffix matching, the shipped "
                             "draft head (head), or suffix + head trees (hybrid)"
                             + (", or none (plain decoding)" if plain_decoding else "")
                             + "; default: tree when there is a draft model, else recycle")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from specrelay.models.resolve import add_model_argument
    from specrelay.shared.flags import add_device_argument, add_redis_argument

    add_model_argument(parser, "the target")
    add_draft_arguments(parser)
    add_redis_argument(parser)
    add_device_argument(parser)
    parser.add_argument("--max-batch-age-s", type=float, default=5.0,
                        help="draft batches published longer ago are dropped undrafted (their verifier has moved on)")


def from_args(args: argparse.Namespace, **settings) -> DrafterConfig | None:
    """The drafter's config from --model, --draft, --proposer and --device (declared by `specrelay drafter` and
    `specrelay serve` alike); `settings`: what the entrypoint decides itself. None: --proposer none."""
    from specrelay.models.resolve import choose_proposer, resolve_model

    model_dir = resolve_model(args.model)
    proposer, draft_dir = choose_proposer(model_dir, args.draft, args.proposer)
    if proposer == "none":
        return None
    return DrafterConfig(str(model_dir), draft_dir and str(draft_dir), proposer, device=args.device, **settings)


def build_config(args: argparse.Namespace) -> DrafterConfig:
    """`specrelay drafter`'s config: a stand-alone drafter, over Redis."""
    from specrelay.shared.errors import ConfigError

    if not args.redis:
        raise ConfigError("a stand-alone drafter needs --redis URL (or SPECRELAY_REDIS)")
    return from_args(args, redis=args.redis, max_batch_age_s=args.max_batch_age_s)


def main(args: argparse.Namespace) -> int:
    cfg = build_config(args)
    logging.basicConfig(level=logging.INFO)

    async def go():
        async with make_bus(cfg.redis) as bus:
            drafter = Drafter(build_proposer(cfg), draft_grammars(cfg.model_dir))
            await serve_until_stopped(serve_drafter(bus, drafter, cfg.consumer, cfg.max_batch_age_s))

    asyncio.run(go())
    return 0
