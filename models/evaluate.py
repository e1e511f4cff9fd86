"""`specrelay models eval`: the pair's figures on held-out data.

- val_loss: next-token cross-entropy on the val split (its own random stream; stdlib files never trained on).
- tool_call_valid_rate: greedy completions of held-out tool-use prompts; valid when the first
  `<tool_call>` block parses as JSON, names a tool offered in the prompt, and carries every required argument.
- top1_agreement: teacher-forced on held-out dialogues, the share of positions where argmax(draft) == argmax(target)
  — with greedy verification this is the chance that one drafted token is accepted.
- first_call_exact_rate (with --details, not part of the JSON): the first call equals the reference call, name and
  arguments. Validity only checks the form; this checks that the values were copied from the request.

`--model DIR` (or FILE.gguf, or a built-in name) measures one model's tool-call validity alone (no draft, no val
loss: the val split is our corpus, meaningless to a model not trained on it). Its prompts are rendered as the gateway
renders them (`shared.tokenizer.Tokenizer.render_chat`), so a template without a tools section gets the Hermes
tools block.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from specrelay.shared.errors import ModelLoadError

TOOL_CALL = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.DOTALL)


@dataclass(frozen=True)
class EvalConfig:
    models_dir: Path  # holds target/ and draft/; or, with single=True, the one model (directory, .gguf, name)
    single: bool = False
    seed: int = 0
    seq_len: int = 1024
    num_val_samples: int = 300
    num_val_windows: int = 64  # the same windows as train_report.json's val_loss
    num_tool_prompts: int = 200
    max_new_tokens: int = 96


def tool_call_is_valid(completion: str, tools: list[dict]) -> bool:
    """The completion's first tool call parses, names an offered tool and has that tool's required arguments."""
    match = TOOL_CALL.search(completion)
    if match is None:
        return False
    try:
        call = json.loads(match.group(1))
    except json.JSONDecodeError:
        return False
    if not isinstance(call, dict) or not isinstance(call.get("arguments"), dict):
        return False
    schemas = {t["function"]["name"]: t["function"] for t in tools}
    schema = schemas.get(call.get("name"))
    if schema is None:
        return False
    return all(arg in call["arguments"] for arg in schema["parameters"].get("required", []))


def _load(directory: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not (directory / "config.json").exists():
        raise ModelLoadError(f"{directory}: no config.json (run `specrelay models train` or `models import` first)")
    model = AutoModelForCausalLM.from_pretrained(directory, dtype="float32")
    return model.eval(), AutoTokenizer.from_pretrained(directory)


def _val_windows(cfg: EvalConfig, tokenizer):
    import torch

    from specrelay.models.corpus import generate

    eot = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    ids: list[int] = []
    for sample in generate(cfg.seed, "val", cfg.num_val_samples):
        ids.extend(tokenizer(sample.text, add_special_tokens=False)["input_ids"] + [eot])
    stream = torch.tensor(ids, dtype=torch.long)
    count = min(cfg.num_val_windows, (len(stream) - 1) // cfg.seq_len)
    return [stream[i * cfg.seq_len: (i + 1) * cfg.seq_len + 1] for i in range(count)]  # each [seq_len + 1]


def loss_and_agreement(target, draft, windows) -> tuple[float, float, float]:
    """(target val loss, draft val loss, top-1 agreement) over the same teacher-forced windows."""
    import torch
    import torch.nn.functional as F

    t_loss = d_loss = 0.0
    agree = total = 0
    with torch.no_grad():
        for w in windows:
            inputs, labels = w[:-1].unsqueeze(0), w[1:]
            t_logits = target(input_ids=inputs).logits[0]  # [seq_len, vocab]
            d_logits = draft(input_ids=inputs).logits[0]  # [seq_len, vocab]
            t_loss += F.cross_entropy(t_logits, labels).item()
            d_loss += F.cross_entropy(d_logits, labels).item()
            agree += (t_logits.argmax(-1) == d_logits.argmax(-1)).sum().item()
            total += labels.numel()
    n = max(len(windows), 1)
    return t_loss / n, d_loss / n, agree / max(total, 1)


def first_call(completion: str) -> dict | None:
    match = TOOL_CALL.search(completion)
    try:
        return json.loads(match.group(1)) if match else None
    except json.JSONDecodeError:
        return None


def _stops(tokenizer) -> tuple[list[int], list[str]]:
    """Token ids that end a completion (end of turn, end of text, the end of a call where it is one token) and
    the stop strings for markers that are not single tokens (SmolLM2 spells `</tool_call>` in pieces)."""
    vocab = tokenizer.get_vocab()
    ids, strings = [], []
    for marker in ("<|im_end|>", "</tool_call>", "<|endoftext|>"):
        if marker in vocab:
            ids.append(vocab[marker])
        elif marker == "</tool_call>":
            strings.append(marker)
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    return ids, strings


def tool_call_rates(model, tokenizer, cfg: EvalConfig, render=None) -> tuple[float, float]:
    """(valid rate, first-call exact-match rate) over greedy completions of the held-out tool prompts.
    `render(messages, tools) -> prompt text`; by default transformers' rendering of the model's template."""
    import torch

    from specrelay.models.corpus import tool_prompts

    if render is None:
        def render(messages, tools):
            return tokenizer.apply_chat_template(messages, tools=tools, tokenize=False, add_generation_prompt=True)
    stop_ids, stop_strings = _stops(tokenizer)
    valid = exact = 0
    prompts = tool_prompts(cfg.seed, cfg.num_tool_prompts)
    for prompt in prompts:
        text = render(prompt.messages, prompt.tools)
        ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])  # [1, prompt_len]
        strings = {"stop_strings": stop_strings, "tokenizer": tokenizer} if stop_strings else {}
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                 max_new_tokens=cfg.max_new_tokens, eos_token_id=stop_ids, pad_token_id=stop_ids[-1],
                                 **strings)
        completion = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=False)
        valid += tool_call_is_valid(completion, prompt.tools)
        exact += first_call(completion) == prompt.expected[0]
    return valid / max(len(prompts), 1), exact / max(len(prompts), 1)


def evaluate_model(cfg: EvalConfig) -> tuple[dict, dict]:
    """One model directory: {"model": {"tool_call_valid_rate"}}, and the details {"first_call_exact_rate"}.
    Prompts are rendered by our gateway's renderer, which is what a served model is sent."""
    from specrelay.models.resolve import resolve_model
    from specrelay.shared.tokenizer import Tokenizer

    model_dir = resolve_model(cfg.models_dir)  # a GGUF file or a built-in name is imported once, as for serve
    model, tokenizer = _load(model_dir)
    ours = Tokenizer(model_dir)
    valid, exact = tool_call_rates(model, tokenizer, cfg,
                                   render=lambda messages, tools: ours.render_chat(messages, tools))
    return {"model": {"tool_call_valid_rate": valid}}, {"first_call_exact_rate": exact}


def evaluate(cfg: EvalConfig) -> tuple[dict, dict]:
    """The agreed figures {"target": {"val_loss", "tool_call_valid_rate"}, "draft": {"val_loss", "top1_agreement"}},
    and the details {"first_call_exact_rate"}."""
    if cfg.single:
        return evaluate_model(cfg)
    target, tokenizer = _load(cfg.models_dir / "target")
    draft, _ = _load(cfg.models_dir / "draft")
    t_loss, d_loss, agreement = loss_and_agreement(target, draft, _val_windows(cfg, tokenizer))
    valid, exact = tool_call_rates(target, tokenizer, cfg)
    figures = {"target": {"val_loss": t_loss, "tool_call_valid_rate": valid},
               "draft": {"val_loss": d_loss, "top1_agreement": agreement}}
    return figures, {"first_call_exact_rate": exact}


def format_table(result: dict) -> str:
    # the pair's agreed goals; a single model (--model) is measured, with no goal on it
    goals = {("target", "tool_call_valid_rate"): ">= 0.95", ("draft", "top1_agreement"): ">= 0.70"}
    rows = [(model, metric, f"{value:.4f}", goals.get((model, metric), ""))
            for model, metrics in result.items() for metric, value in metrics.items()]
    header = ("model", "metric", "value", "goal")
    widths = [max(len(r[i]) for r in rows + [header]) for i in range(4)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in [header] + rows]
    return "\n".join(lines)
