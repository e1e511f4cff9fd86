"""Block hash chains and span keys: a block's key names its model and its whole prefix, nothing else."""

from __future__ import annotations

import pytest

from specrelay.services.kvstore import block_hashes, model_root, span_key


def test_chain_covers_full_blocks_only_and_is_deterministic():
    hashes = block_hashes("llama-3-8b", list(range(10)), block_size=4)
    assert len(hashes) == 2  # tokens 8 and 9 are a partial block: not cacheable yet
    assert all(len(h) == 32 for h in hashes)
    assert hashes == block_hashes("llama-3-8b", list(range(10)), block_size=4)


def test_a_block_key_depends_on_every_earlier_token_and_on_the_model():
    base = block_hashes("m", [1, 2, 3, 4, 5, 6, 7, 8], 4)
    changed_first = block_hashes("m", [9, 2, 3, 4, 5, 6, 7, 8], 4)
    assert changed_first[1] != base[1]  # same tokens in block 1, different prefix: different KV
    assert block_hashes("other-model", [1, 2, 3, 4, 5, 6, 7, 8], 4) != base
    shared = block_hashes("m", [1, 2, 3, 4, 0, 0, 0, 0], 4)
    assert shared[0] == base[0] and shared[1] != base[1]


def test_continuing_a_chain_from_a_parent_equals_hashing_it_whole():
    tokens = list(range(100, 124))
    whole = block_hashes("m", tokens, 8)
    assert block_hashes("m", tokens[8:], 8, parent=whole[0]) == whole[1:]


def test_encoding_is_canonical_and_collision_resistant_across_key_kinds():
    assert block_hashes("m", [1, 2], 2) == block_hashes("m", (1, 2), 2)
    assert block_hashes("m", [256], 1) != block_hashes("m", [1], 1)
    assert span_key("ab", "c") != span_key("a", "bc")
    assert span_key("m", 1) == span_key("m", "1")
    assert span_key("m") != model_root("m")
    with pytest.raises(ValueError, match="uint32"):
        block_hashes("m", [-1], 1)
