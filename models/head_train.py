"""`specrelay models train-head`: train the EAGLE-style draft head (shared/modeling/draft_head.py) of a target,
offline on this CPU, on the target's own greedy outputs (head_data.py).

Loss (EAGLE, arXiv 2401.15077, with EAGLE-3's training-time test cut to two steps): at every generated position t,
step 1 feeds (h_t, x_{t+1}) and is scored on the target's next token x_{t+2} (cross-entropy over the draft
vocabulary) and on the target's next feature h_{t+1} (smooth L1); step 2 feeds step 1's own prediction f'_{t+1}
with x_{t+2} and is scored on x_{t+3}, as the head drafts two deep. The draft vocabulary is the `draft_vocab` most
frequent tokens of the target's outputs (then of the prompts), FR-Spec's frequency-ranked cut.
"""

from __future__ import annotations

import json
import math
import random
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from specrelay.models.head_data import Sequence, generate_with_features, training_prompts
from specrelay.shared.modeling.draft_head import DraftHead, HeadConfig

REPORT = "head_report.json"


@dataclass
class HeadTrainConfig:
    model_dir: Path
    out_dir: Path
    num_prompts: int = 64
    max_tokens: int = 64
    draft_vocab: int = 4096
    train_s: float = 420.0  # optimizer steps stop after this long (or at max_steps)
    max_steps: int = 4000
    seqs_per_step: int = 4
    window: int = 96  # tokens of one training sequence
    lr: float = 2e-3
    held_out: float = 0.1
    seed: int = 0


def draft_vocabulary(seqs: list[Sequence], prompts: list[list[int]], size: int, vocab_size: int) -> torch.Tensor:
    """[size] target ids: most frequent among the target's choices, then in the prompts, then the lowest ids."""
    ranked = [t for t, _ in Counter(t for s in seqs for t in s.labels if t >= 0).most_common()]
    seen = set(ranked)
    ranked += [t for t, _ in Counter(t for p in prompts for t in p).most_common() if t not in seen]
    seen = set(ranked)
    ranked += [t for t in range(vocab_size) if t not in seen][: max(0, size - len(ranked))]
    return torch.tensor(ranked[:size])


def _batch(seqs: list[Sequence]):
    """Pack sequences into one, with a block-diagonal causal mask."""
    seg = torch.cat([torch.full((len(s.tokens),), j) for j, s in enumerate(seqs)])
    mask = (seg[:, None] == seg[None, :]) & torch.ones(len(seg), len(seg), dtype=torch.bool).tril()
    pos = torch.cat([torch.arange(s.start, s.start + len(s.tokens)) for s in seqs])
    feats = torch.cat([s.features for s in seqs]).float()
    tokens, labels = torch.tensor([t for s in seqs for t in s.tokens]), torch.tensor([y for s in seqs for y in s.labels])
    return feats, tokens, labels, pos, seg, mask


def losses(head: DraftHead, seqs: list[Sequence], to_draft: torch.Tensor):
    """(loss, step-1 correct, step-2 correct, step-1 counted, step-2 counted); to_draft maps a target id to its
    draft index, -100 outside the draft vocabulary (counted as a miss)."""
    feats, toks, labels, pos, seg, mask = _batch(seqs)
    known = labels >= 0
    y = torch.where(known, to_draft[labels.clamp(min=0)], -100)
    # step 1: index j feeds (h before x_j, x_j); scored on the target's choice after x_j and on h at x_j
    x, q, k, v = head.qkv(feats, toks, pos)
    f1 = head.finish(x, q, k, v, mask)
    logits1 = head.logits(f1)
    ce1 = F.cross_entropy(logits1, y, ignore_index=-100)
    same = torch.zeros(len(toks), dtype=torch.bool)
    same[:-1] = seg[1:] == seg[:-1]
    reg = F.smooth_l1_loss(f1[same], feats[1:][same[:-1]])
    # step 2: index j feeds the head's own f' of index j - 1 in place of the target's h
    x2, q2, k2, v2 = head.qkv(torch.roll(f1, 1, 0), toks, pos)
    logits2 = head.logits(head.finish(x2, q2, k2, v2, mask))
    y2 = torch.where(torch.roll(same, 1), y, -100)
    ce2 = F.cross_entropy(logits2, y2, ignore_index=-100)
    correct1 = int(((logits1.argmax(-1) == y) & (y >= 0)).sum())
    correct2 = int(((logits2.argmax(-1) == y2) & (y2 >= 0)).sum())
    return ce1 + reg + 0.5 * ce2, correct1, correct2, int(known.sum()), int((torch.roll(same, 1) & known).sum())


def _stop_ids(tok) -> set[int]:
    return {i for i in (tok.eos_token_id, tok.token_to_id("<|endoftext|>")) if i is not None}


def train_head(cfg: HeadTrainConfig, log=print) -> dict:
    from specrelay.shared.modeling.loader import load_model
    from specrelay.shared.modeling.runner import ModelRunner
    from specrelay.shared.tokenizer import Tokenizer

    torch.manual_seed(cfg.seed)
    t0 = time.perf_counter()
    target = load_model(str(cfg.model_dir))
    prompts = training_prompts(Tokenizer(str(cfg.model_dir)), cfg.num_prompts, seed=1000 + cfg.seed)
    seqs = generate_with_features(ModelRunner(target, num_blocks=2048), prompts, cfg.max_tokens,
                                  _stop_ids(Tokenizer(str(cfg.model_dir))))
    gen_s = time.perf_counter() - t0
    log(f"generated {sum(len(s.tokens) for s in seqs)} tokens in {len(seqs)} sequences ({gen_s:.0f} s)")
    random.Random(cfg.seed).shuffle(seqs)
    num_eval = max(1, int(len(seqs) * cfg.held_out))  # held out by prompt, then cut into training windows
    evals = [w for s in seqs[:num_eval] for w in s.windows(cfg.window)]
    trains = [w for s in seqs[num_eval:] for w in s.windows(cfg.window)]
    head = DraftHead(HeadConfig.for_target(target, cfg.draft_vocab))
    head.vocab_ids.copy_(draft_vocabulary(trains, prompts, head.cfg.draft_vocab, target.config.vocab_size))
    head.bind(target)
    to_draft = torch.full((target.config.vocab_size,), -100)
    to_draft[head.vocab_ids] = torch.arange(len(head.vocab_ids))
    opt = torch.optim.AdamW(head.parameters(), lr=cfg.lr, weight_decay=0.0)
    rng, step, t1, loss = random.Random(cfg.seed), 0, time.perf_counter(), float("nan")
    while step < cfg.max_steps and time.perf_counter() - t1 < cfg.train_s:
        frac = min(1.0, (time.perf_counter() - t1) / cfg.train_s)
        for group in opt.param_groups:  # cosine to a tenth, on the clock: the budget is time, not steps
            group["lr"] = cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))
        total, *_ = losses(head, rng.sample(trains, min(cfg.seqs_per_step, len(trains))), to_draft)
        opt.zero_grad()
        total.backward()
        torch.nn.utils.clip_grad_norm_(head.parameters(), 1.0)
        opt.step()
        step, loss = step + 1, float(total.detach())
        if step % 50 == 0:
            log(f"step {step}  loss {loss:.3f}")
    head.eval()
    with torch.no_grad():
        results = [losses(head, [s], to_draft) for s in evals]
    report = {
        "target": cfg.model_dir.name, "num_prompts": cfg.num_prompts, "max_tokens": cfg.max_tokens,
        "train_windows": len(trains), "train_tokens": sum(len(s.tokens) for s in trains),
        "held_out_windows": len(evals), "held_out_tokens": sum(len(s.tokens) for s in evals),
        "draft_vocab": head.cfg.draft_vocab, "steps": step, "seqs_per_step": cfg.seqs_per_step,
        "final_train_loss": round(loss, 4),
        "held_out_loss": round(sum(float(r[0]) for r in results) / len(results), 4),
        "held_out_top1": round(sum(r[1] for r in results) / max(1, sum(r[3] for r in results)), 4),
        "held_out_top1_depth2": round(sum(r[2] for r in results) / max(1, sum(r[4] for r in results)), 4),
        "generate_s": round(gen_s), "train_s": round(time.perf_counter() - t1), "threads": torch.get_num_threads(),
    }
    head.save(cfg.out_dir)
    (cfg.out_dir / REPORT).write_text(json.dumps(report, indent=2) + "\n")
    log(json.dumps(report))
    return report
