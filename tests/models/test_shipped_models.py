"""The committed pair under models/: loads with transformers, fits the size rules, and evaluates to the agreed JSON."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from specrelay.models.chat_template import CHAT_TEMPLATE
from specrelay.models.cli import DEFAULT_MODELS_DIR

TARGET, DRAFT = DEFAULT_MODELS_DIR / "target", DEFAULT_MODELS_DIR / "draft"
pytestmark = pytest.mark.skipif(not (TARGET / "model.safetensors").exists() or not (DRAFT / "model.safetensors").exists(),
                                reason="models/target and models/draft are not trained yet")


@pytest.fixture(scope="module")
def pair():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return (AutoModelForCausalLM.from_pretrained(TARGET), AutoModelForCausalLM.from_pretrained(DRAFT),
            AutoTokenizer.from_pretrained(TARGET))


def _size(directory: Path) -> int:
    return sum(f.stat().st_size for f in directory.iterdir() if f.is_file())


def test_both_load_as_llama_and_the_draft_is_at_most_an_eighth_of_the_target(pair):
    target, draft, _ = pair
    assert type(target).__name__ == type(draft).__name__ == "LlamaForCausalLM"
    n_target = sum(p.numel() for p in target.parameters())
    n_draft = sum(p.numel() for p in draft.parameters())
    assert 2_000_000 <= n_target <= 20_000_000
    assert n_draft * 8 <= n_target
    assert target.config.vocab_size == draft.config.vocab_size
    assert target.config.max_position_embeddings >= 4096 and draft.config.max_position_embeddings >= 4096


def test_the_pair_shares_one_tokenizer_with_the_chat_template_and_fits_in_40_mb():
    assert (TARGET / "tokenizer.json").read_bytes() == (DRAFT / "tokenizer.json").read_bytes()
    for directory in (TARGET, DRAFT):
        assert json.loads((directory / "tokenizer_config.json").read_text())["chat_template"] == CHAT_TEMPLATE
    assert _size(TARGET) + _size(DRAFT) <= 40 * 1024 * 1024


def test_the_target_answers_a_held_out_tool_prompt_with_a_valid_call(pair):
    from specrelay.models.evaluate import EvalConfig, tool_call_rates

    target, _, tokenizer = pair
    valid, _ = tool_call_rates(target, tokenizer, EvalConfig(models_dir=DEFAULT_MODELS_DIR, num_tool_prompts=3))
    assert valid >= 2 / 3


def test_eval_json_has_the_agreed_schema(tmp_path):
    from specrelay.models.evaluate import EvalConfig, evaluate

    figures, details = evaluate(EvalConfig(models_dir=DEFAULT_MODELS_DIR, num_val_windows=2, num_tool_prompts=2))
    assert {k: set(v) for k, v in figures.items()} == {"target": {"val_loss", "tool_call_valid_rate"},
                                                       "draft": {"val_loss", "top1_agreement"}}
    assert all(isinstance(x, float) for v in figures.values() for x in v.values())
    assert 0.0 <= details["first_call_exact_rate"] <= 1.0
