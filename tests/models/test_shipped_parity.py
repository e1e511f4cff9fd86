"""The shipped pair loads with transformers and with our loader, and both give the same logits."""

from pathlib import Path

import pytest
import torch

from specrelay.models.corpus import tool_prompts
from specrelay.shared.modeling.kv_cache import BlockTable
from specrelay.shared.modeling.loader import load_model
from specrelay.shared.modeling.runner import ModelRunner, StepInput
from specrelay.shared.tokenizer import Tokenizer

MODELS = Path(__file__).resolve().parents[2] / "models"


@pytest.mark.parametrize("name", ["target", "draft"])
def test_our_loader_and_transformers_give_equal_logits(name):
    from transformers import AutoModelForCausalLM

    path = MODELS / name
    prompt = tool_prompts(seed=3, num_prompts=1)[0]
    ids = Tokenizer(path).apply_chat_template(prompt.messages, tools=prompt.tools)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        expected = hf(torch.tensor([ids])).logits[0]
    runner = ModelRunner(load_model(path), num_blocks=64)
    ours = runner.forward([StepInput(BlockTable(), ids, logits_rows=list(range(len(ids))))])[0]
    assert (ours - expected).abs().max().item() <= 1e-4
