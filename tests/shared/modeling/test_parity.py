"""Our forward against transformers' on random tiny models of every family: logits and greedy tokens."""

import pytest
import torch

from specrelay.shared.modeling.kv_cache import BlockTable
from specrelay.shared.modeling.loader import load_model
from specrelay.shared.modeling.runner import ModelRunner, StepInput
from specrelay.shared.sampling import SamplingParams

from .conftest import FAMILIES, VOCAB


@pytest.mark.parametrize("family", FAMILIES)
def test_prefill_and_decode_logits_match_transformers(family, hf_model_dirs):
    path, hf = hf_model_dirs[family]
    runner = ModelRunner(load_model(path), num_blocks=32, block_size=16)
    gen = torch.Generator().manual_seed(7)
    ids = torch.randint(0, VOCAB, (57,), generator=gen).tolist()  # 37 prompt tokens + 20 decode steps
    with torch.no_grad():
        expected = hf(torch.tensor([ids])).logits[0]  # [57, vocab]

    table = BlockTable()
    prefill = runner.forward([StepInput(table, ids[:37], logits_rows=list(range(37)))])[0]
    decode = torch.cat([runner.forward([StepInput(table, [tok])])[0] for tok in ids[37:]])
    assert (prefill - expected[:37]).abs().max().item() <= 1e-4
    assert (decode - expected[37:]).abs().max().item() <= 1e-4


@pytest.mark.parametrize("family", FAMILIES)
def test_64_greedy_tokens_equal_transformers_generate(family, hf_model_dirs):
    path, hf = hf_model_dirs[family]
    runner = ModelRunner(load_model(path), num_blocks=32, block_size=16)
    prompt = torch.randint(0, VOCAB, (37,), generator=torch.Generator().manual_seed(3)).tolist()
    ours = runner.generate([prompt], SamplingParams(max_tokens=64))[0]
    theirs = hf.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=64,
                         attention_mask=torch.ones(1, 37, dtype=torch.long))[0, 37:].tolist()
    assert ours == theirs


def test_batched_generate_equals_one_at_a_time(hf_model_dirs):
    path, _ = hf_model_dirs["qwen3"]
    runner = ModelRunner(load_model(path), num_blocks=64, block_size=16)
    gen = torch.Generator().manual_seed(5)
    prompts = [torch.randint(0, VOCAB, (n,), generator=gen).tolist() for n in (5, 23, 40, 17)]
    params = SamplingParams(max_tokens=24)
    batched = runner.generate(prompts, params)
    assert batched == [runner.generate([p], params)[0] for p in prompts]
    assert runner.cache.num_free_blocks == 64  # every block came back


def test_chunked_prefill_equals_one_shot(hf_model_dirs):
    path, _ = hf_model_dirs["llama3-rope"]
    model = load_model(path)
    prompt = torch.randint(0, VOCAB, (150,), generator=torch.Generator().manual_seed(11)).tolist()
    one_shot = ModelRunner(model, num_blocks=32, prefill_chunk=1024).prefill(BlockTable(), prompt)
    chunked = ModelRunner(model, num_blocks=32, prefill_chunk=32).prefill(BlockTable(), prompt)
    assert (one_shot - chunked).abs().max().item() <= 1e-4


def test_seeded_sampling_is_reproducible(hf_model_dirs):
    path, _ = hf_model_dirs["mistral"]
    runner = ModelRunner(load_model(path), num_blocks=32)
    params = SamplingParams(temperature=1.0, top_p=0.9, top_k=50, seed=123, max_tokens=20)
    first = runner.generate([[1, 2, 3]], params)
    assert runner.generate([[1, 2, 3]], params) == first
    assert runner.generate([[1, 2, 3]], SamplingParams(temperature=1.0, seed=124, max_tokens=20)) != first
