"""`specrelay models train`: corpus -> tokenizer -> target (next-token CE) -> draft (distilled from the target).

The draft is trained on the target's soft labels, forward KL(p_target || p_draft) per position (Hinton et al.,
arXiv 1503.02531, temperature 1). Speculative sampling accepts a drafted token with probability
min(1, p_target / p_draft) (Leviathan et al., arXiv 2211.17192), so the acceptance rate is 1 - TV(p_target, p_draft);
matching the whole distribution, not only the argmax, is what raises it.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from specrelay.shared.errors import ConfigError


@dataclass(frozen=True)
class ModelShape:
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    tie_embeddings: bool


@dataclass(frozen=True)
class TrainConfig:
    out_dir: Path
    device: str = "cpu"
    seed: int = 0
    vocab_size: int = 4096
    seq_len: int = 1024  # long windows: served prompts with six tool schemas reach ~600 tokens
    batch_size: int = 4
    num_train_samples: int = 14000
    num_val_samples: int = 300
    target_steps: int = 650
    draft_steps: int = 450
    target_lr: float = 2e-3
    draft_lr: float = 3e-3
    warmup_steps: int = 40
    target: ModelShape = field(default_factory=lambda: ModelShape(256, 6, 8, 4, 704, False))
    draft: ModelShape = field(default_factory=lambda: ModelShape(128, 2, 4, 2, 224, True))
    max_position_embeddings: int = 4096
    log_every: int = 20


def quick_config(out_dir: Path, device: str = "cpu", seed: int = 0) -> TrainConfig:
    """A smoke run of the whole pipeline in seconds: same code, toy sizes."""
    return TrainConfig(out_dir=out_dir, device=device, seed=seed, vocab_size=400, seq_len=64, batch_size=4,
                       num_train_samples=150, num_val_samples=20, target_steps=4, draft_steps=4, warmup_steps=1,
                       target=ModelShape(64, 2, 4, 2, 128, False), draft=ModelShape(16, 1, 2, 1, 32, True),
                       log_every=2)


def llama_config(shape: ModelShape, cfg: TrainConfig, tokenizer):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=tokenizer.get_vocab_size(), hidden_size=shape.hidden_size,
        intermediate_size=shape.intermediate_size, num_hidden_layers=shape.num_layers,
        num_attention_heads=shape.num_heads, num_key_value_heads=shape.num_kv_heads,
        max_position_embeddings=cfg.max_position_embeddings, rms_norm_eps=1e-5, rope_theta=10000.0,
        tie_word_embeddings=shape.tie_embeddings, bos_token_id=None, eos_token_id=tokenizer.token_to_id("<|im_end|>"),
        pad_token_id=tokenizer.token_to_id("<|endoftext|>"), torch_dtype="float32")


def encode_stream(samples, tokenizer):
    """All samples as one token stream, each document followed by <|endoftext|>."""
    import torch

    eot = tokenizer.token_to_id("<|endoftext|>")
    ids: list[int] = []
    for enc in tokenizer.encode_batch([s.text for s in samples]):
        ids.extend(enc.ids)
        ids.append(eot)
    return torch.tensor(ids, dtype=torch.long)  # [num_tokens]


def batches(stream, cfg: TrainConfig, steps: int, seed: int):
    """Random windows of seq_len + 1 tokens; a seeded generator makes the order reproducible."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        starts = torch.randint(0, len(stream) - cfg.seq_len - 1, (cfg.batch_size,), generator=gen)
        yield torch.stack([stream[s:s + cfg.seq_len + 1] for s in starts.tolist()])  # [batch, seq_len + 1]


def lr_at(step: int, steps: int, peak: float, warmup: int) -> float:
    """Linear warm-up, then cosine decay to a tenth of the peak."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def _optimizer(model, lr: float):
    import torch

    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    rest = [p for n, p in model.named_parameters() if p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}],
                             lr=lr, betas=(0.9, 0.95))


# Each phase draws its own window order (str hashes are salted per process, so no hash(name) here).
_PHASE_SEED = {"target": 1, "draft": 2}


def _run(model, cfg: TrainConfig, stream, steps: int, peak_lr: float, loss_fn, name: str, log) -> list[float]:
    import torch

    opt = _optimizer(model, peak_lr)
    model.train()
    losses, started = [], time.time()
    for step, batch in enumerate(batches(stream, cfg, steps, cfg.seed * 100 + _PHASE_SEED[name])):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, steps, peak_lr, cfg.warmup_steps)
        batch = batch.to(cfg.device)
        loss = loss_fn(batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        if step % cfg.log_every == 0 or step == steps - 1:
            log(f"{name} step {step + 1}/{steps} loss {sum(losses[-cfg.log_every:]) / len(losses[-cfg.log_every:]):.4f}"
                f" ({time.time() - started:.0f}s)")
    model.eval()
    return losses


def train_target(model, cfg: TrainConfig, stream, log) -> list[float]:
    return _run(model, cfg, stream, cfg.target_steps, cfg.target_lr, lambda batch: _ce(model, batch), "target", log)


def _ce(model, batch):
    import torch.nn.functional as F

    logits = model(input_ids=batch[:, :-1]).logits  # [batch, seq_len, vocab]
    return F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten())


def distill_draft(draft, target, cfg: TrainConfig, stream, log) -> list[float]:
    import torch
    import torch.nn.functional as F

    def loss_fn(batch):  # batch: [batch, seq_len + 1]
        inputs = batch[:, :-1]
        with torch.no_grad():
            teacher = F.log_softmax(target(input_ids=inputs).logits.float(), dim=-1)  # [batch, seq_len, vocab]
        student = F.log_softmax(draft(input_ids=inputs).logits.float(), dim=-1)  # [batch, seq_len, vocab]
        # KL(p_t || p_d) = sum_v p_t (log p_t - log p_d), averaged over positions
        return F.kl_div(student.flatten(0, 1), teacher.flatten(0, 1), log_target=True, reduction="batchmean")

    return _run(draft, cfg, stream, cfg.draft_steps, cfg.draft_lr, loss_fn, "draft", log)


def val_loss(model, stream, cfg: TrainConfig, max_windows: int = 64) -> float:
    """Mean next-token CE over consecutive, non-overlapping windows of the held-out stream."""
    import torch

    windows = stream[: (len(stream) - 1) // cfg.seq_len * cfg.seq_len + 1]
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(min(max_windows, (len(windows) - 1) // cfg.seq_len)):
            w = windows[i * cfg.seq_len: (i + 1) * cfg.seq_len + 1].unsqueeze(0).to(cfg.device)
            total += _ce(model, w).item()
            count += 1
    return total / max(count, 1)


def num_params(model) -> int:
    return sum(p.numel() for p in model.parameters())  # tied weights appear once in parameters()


def train(cfg: TrainConfig, log=print) -> dict:
    """Run every step and write `out_dir/target`, `out_dir/draft` and `out_dir/train_report.json`."""
    import torch
    from transformers import LlamaForCausalLM

    from specrelay.models.corpus import generate
    from specrelay.models.tokenizer_train import train_tokenizer

    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: no CUDA device is visible")
    torch.manual_seed(cfg.seed)
    started = time.time()
    timings: dict[str, float] = {}

    t = time.time()
    train_samples = generate(cfg.seed, "train", cfg.num_train_samples)
    val_samples = generate(cfg.seed, "val", cfg.num_val_samples)
    tokenizer = train_tokenizer((s.text for s in train_samples[:6000]), cfg.vocab_size)
    train_stream, val_stream = encode_stream(train_samples, tokenizer), encode_stream(val_samples, tokenizer)
    timings["corpus_and_tokenizer_s"] = time.time() - t
    log(f"corpus: {len(train_samples)} train samples ({len(train_stream)} tokens), {len(val_samples)} val samples "
        f"({len(val_stream)} tokens); tokenizer vocab {tokenizer.get_vocab_size()} ({timings['corpus_and_tokenizer_s']:.0f}s)")

    target = LlamaForCausalLM(llama_config(cfg.target, cfg, tokenizer)).to(cfg.device)
    draft = LlamaForCausalLM(llama_config(cfg.draft, cfg, tokenizer)).to(cfg.device)
    n_target, n_draft = num_params(target), num_params(draft)
    if n_draft * 8 > n_target:
        raise ConfigError(f"the draft has {n_draft} parameters, more than 1/8 of the target's {n_target}")
    log(f"target {n_target / 1e6:.2f}M parameters, draft {n_draft / 1e6:.3f}M ({n_target / n_draft:.1f}x smaller)")

    t = time.time()
    target_losses = train_target(target, cfg, train_stream, log)
    timings["target_s"] = time.time() - t
    t = time.time()
    draft_losses = distill_draft(draft, target, cfg, train_stream, log)
    timings["draft_s"] = time.time() - t

    report = {
        "device": cfg.device, "seed": cfg.seed, "dtype": "float32",
        "config": json.loads(json.dumps(asdict(replace(cfg, out_dir=str(cfg.out_dir))), default=str)),
        "train_tokens": len(train_stream), "val_tokens": len(val_stream),
        "target": {"params": n_target, "tokens_seen": cfg.target_steps * cfg.batch_size * cfg.seq_len,
                   "final_train_loss": sum(target_losses[-10:]) / len(target_losses[-10:]),
                   "val_loss": val_loss(target, val_stream, cfg)},
        "draft": {"params": n_draft, "tokens_seen": cfg.draft_steps * cfg.batch_size * cfg.seq_len,
                  "final_train_kl": sum(draft_losses[-10:]) / len(draft_losses[-10:]),
                  "val_loss": val_loss(draft, val_stream, cfg)},
    }
    save_pair(target, draft, tokenizer, cfg.out_dir)
    timings["total_s"] = time.time() - started
    report["timings"] = timings
    (cfg.out_dir / "train_report.json").write_text(json.dumps(report, indent=2) + "\n")
    log(f"done in {timings['total_s']:.0f}s: target val loss {report['target']['val_loss']:.4f}, "
        f"draft val loss {report['draft']['val_loss']:.4f}")
    return report


def save_pair(target, draft, tokenizer, out_dir: Path) -> None:
    """Write `out_dir/target` and `out_dir/draft` as Hugging Face directories (greedy generation config, both
    end-of-turn tokens as EOS), each with the tokenizer."""
    from transformers import GenerationConfig

    from specrelay.models.tokenizer_train import save_tokenizer

    eos = [tokenizer.token_to_id("<|im_end|>"), tokenizer.token_to_id("<|endoftext|>")]
    for name, model in (("target", target), ("draft", draft)):
        directory = out_dir / name
        if directory.exists():
            shutil.rmtree(directory)
        model.to("cpu").save_pretrained(directory, safe_serialization=True)
        GenerationConfig(eos_token_id=eos, pad_token_id=eos[1], do_sample=False).save_pretrained(directory)
        save_tokenizer(tokenizer, directory)
