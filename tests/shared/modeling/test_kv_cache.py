"""The paged cache: freeing, reusing, sharing and copying blocks never changes what the model computes."""

import pytest
import torch

from specrelay.shared.modeling.kv_cache import BlockTable, OutOfBlocks
from specrelay.shared.modeling.loader import load_model
from specrelay.shared.modeling.runner import ModelRunner, StepInput

from .conftest import VOCAB


@pytest.fixture(scope="module")
def runner(hf_model_dirs):
    path, _ = hf_model_dirs["llama"]
    return ModelRunner(load_model(path), num_blocks=24, block_size=4)


def tokens(seed: int, n: int) -> list[int]:
    return torch.randint(0, VOCAB, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def test_reused_blocks_give_the_same_logits(runner):
    prompt = tokens(0, 19)
    first = BlockTable()
    expected = runner.prefill(first, prompt)
    runner.release(first)
    # Scribble over every freed block with another sequence, free it, and compute the prompt again.
    other = BlockTable()
    runner.prefill(other, tokens(1, 40))
    runner.release(other)
    again = BlockTable()
    assert (runner.prefill(again, prompt) - expected).abs().max().item() == 0.0
    runner.release(again)
    assert runner.cache.num_free_blocks == 24


def test_forked_sequences_share_a_prefix_and_diverge_privately(runner):
    prompt, a_tail, b_tail = tokens(2, 10), tokens(3, 7), tokens(4, 9)
    base = BlockTable()
    runner.prefill(base, prompt)
    a, b = runner.cache.fork(base), runner.cache.fork(base)
    free_before = runner.cache.num_free_blocks
    a_logits = runner.forward([StepInput(a, a_tail)])[0]
    b_logits = runner.forward([StepInput(b, b_tail)])[0]
    # The shared, partly filled last block (10 % 4 != 0) was copied before each write.
    assert runner.cache.num_free_blocks < free_before
    for tail, logits in ((a_tail, a_logits), (b_tail, b_logits)):
        alone = BlockTable()
        assert (runner.prefill(alone, prompt + tail) - logits[0]).abs().max().item() <= 1e-5
        runner.release(alone)
    base_next = runner.forward([StepInput(base, [5])])[0]
    alone = BlockTable()
    assert (runner.prefill(alone, prompt + [5]) - base_next[0]).abs().max().item() <= 1e-5
    for table in (alone, a, b, base):
        runner.release(table)
    assert runner.cache.num_free_blocks == 24


def test_copied_and_moved_slots_carry_the_kv(runner):
    prompt = tokens(5, 13)
    src = BlockTable()
    runner.prefill(src, prompt)
    expected = runner.forward([StepInput(src, [7])])[0]
    runner.cache.truncate(src, 13)
    # Move the whole prompt's KV into a freshly reserved sequence, slot by slot.
    dst = BlockTable()
    dst_slots = runner.cache.reserve(dst, 13)
    dst.num_tokens = 13
    bs = runner.cache.block_size
    src_slots = [src.blocks[p // bs] * bs + p % bs for p in range(13)]
    runner.cache.move_slots(src_slots, dst_slots)
    runner.release(src)
    assert (runner.forward([StepInput(dst, [7])])[0] - expected).abs().max().item() == 0.0
    runner.release(dst)


def test_truncate_rolls_back_rejected_tokens(runner):
    prompt = tokens(6, 11)
    table = BlockTable()
    runner.prefill(table, prompt)
    runner.forward([StepInput(table, tokens(7, 9))])  # speculated tokens, then rejected
    runner.cache.truncate(table, 11)
    after = runner.forward([StepInput(table, [3])])[0]
    alone = BlockTable()
    assert (runner.prefill(alone, prompt + [3]) - after[0]).abs().max().item() <= 1e-5
    runner.release(table)
    runner.release(alone)


def test_a_full_cache_is_a_clear_error_and_loses_nothing(runner):
    table = BlockTable()
    with pytest.raises(OutOfBlocks, match="KV cache full"):
        runner.prefill(table, tokens(8, 24 * 4 + 1))
    assert runner.cache.num_free_blocks == 24
