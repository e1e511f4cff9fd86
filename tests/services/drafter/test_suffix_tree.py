"""The suffix tree SuffixDecoding speculates from, on hand-built sequences: what occurs, how often, what a removal
leaves behind, and that growing a sequence token by token builds the same tree as adding it at once."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from specrelay.services.drafter.suffix_tree import Node, SuffixTree


def substring_counts(seqs: list[list[int]], max_depth: int) -> Counter:
    """Occurrences of every substring of length 1..max_depth, counted the slow way."""
    counts: Counter = Counter()
    for seq in seqs:
        for start in range(len(seq)):
            for end in range(start + 1, min(start + max_depth, len(seq)) + 1):
                counts[tuple(seq[start:end])] += 1
    return counts


def tree_counts(tree: SuffixTree) -> Counter:
    counts: Counter = Counter()

    def walk(node: Node, path: tuple[int, ...]) -> None:
        for token, child in node.children.items():
            assert child.count > 0, "a node nobody holds must be freed"
            counts[path + (token,)] = child.count
            walk(child, path + (token,))

    walk(tree.root, ())
    return counts


def test_every_substring_is_counted_up_to_the_depth():
    tree = SuffixTree(max_depth=3)
    tree.extend("a", [1, 2, 1, 2, 3])
    assert tree.num_tokens == 5
    assert tree.find([1, 2]).count == 2
    assert tree.find([2, 1, 2]).count == 1
    assert tree.find([1, 2, 3]).count == 1
    assert tree.find([1, 2, 1, 2]) is None  # longer than max_depth: not kept
    assert tree.find([3, 1]) is None
    assert tree_counts(tree) == substring_counts([[1, 2, 1, 2, 3]], 3)
    # what followed [1, 2]: 1 once, 3 once
    assert {t: c.count for t, c in tree.find([1, 2]).children.items()} == {1: 1, 3: 1}


def test_matches_are_the_context_suffixes_that_occur():
    tree = SuffixTree(max_depth=8)
    tree.extend(0, [5, 6, 7, 8, 9])
    found = tree.matches([1, 6, 7, 8], max_len=8)
    assert [n.count for n in found] == [1, 1, 1]  # [8], [7, 8], [6, 7, 8]; [1, 6, 7, 8] never occurred
    assert found[2] is tree.find([6, 7, 8])
    assert len(tree.matches([1, 6, 7, 8], max_len=2)) == 2
    assert tree.matches([4], max_len=8) == []


@pytest.mark.parametrize("max_depth", [1, 4, 24])
def test_growing_token_by_token_equals_adding_at_once_across_interleaved_sequences(max_depth):
    rng = random.Random(max_depth)
    seqs = {k: [rng.randrange(5) for _ in range(rng.randrange(1, 40))] for k in range(4)}
    incremental = SuffixTree(max_depth)
    for i in range(max(len(s) for s in seqs.values())):  # sequences grow interleaved, as a batch does
        for k, s in seqs.items():
            if i < len(s):
                incremental.append(k, s[i])
    assert tree_counts(incremental) == substring_counts(list(seqs.values()), max_depth)
    assert incremental.num_tokens == sum(len(s) for s in seqs.values())


def test_removing_a_sequence_leaves_exactly_the_others():
    rng = random.Random(3)
    seqs = [[rng.randrange(4) for _ in range(30)] for _ in range(3)]
    tree = SuffixTree(max_depth=6)
    for k, s in enumerate(seqs):
        tree.extend(k, s)
    tree.remove(1)
    assert tree_counts(tree) == substring_counts([seqs[0], seqs[2]], 6)
    assert list(tree.seqs) == [0, 2]
    tree.remove(0)
    tree.remove(2)
    assert tree.root.children == {} and tree.num_tokens == 0
    tree.extend(1, [1, 2])  # a removed key can come back and grows from scratch
    assert tree_counts(tree) == substring_counts([[1, 2]], 6)


def test_a_sequence_removed_while_another_still_grows_keeps_the_other_growing():
    tree = SuffixTree(max_depth=4)
    tree.extend("old", [1, 2, 3, 1, 2])
    tree.extend("live", [1, 2])
    tree.remove("old")
    tree.extend("live", [3, 4])
    assert tree_counts(tree) == substring_counts([[1, 2, 3, 4]], 4)
