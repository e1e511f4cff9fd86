"""A suffix tree with counts, as SuffixDecoding (arXiv 2411.04975) speculates from: every substring of length at
most `max_depth` of the sequences added, each with the number of times it occurs.

A node is a substring; its children are the tokens that followed it, and count(child) / count(node) estimates the
chance that the next token is the child's. Depth is bounded because speculation needs only a pattern (the end of
the context) plus the tokens drafted after it; the bound keeps a token's insertion O(max_depth). Sequences grow one
token at a time (`append`): the nodes of the suffixes that can still grow (those of length < max_depth) are kept,
and each steps down to its child for the new token. `remove` subtracts a whole sequence again, which is how a
bounded cache evicts its oldest request. Plain Python: no torch.

The tree is uncompressed (one node per token of each suffix), unlike Arctic Inference's path-compressed one:
simpler to update and remove, at about 6 MB per 1,000 novel tokens at depth 24, which is why callers bound what
they add.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable, Sequence


class Node:
    __slots__ = ("count", "children")

    def __init__(self) -> None:
        self.count = 0  # occurrences of this node's substring (the root: tokens added)
        self.children: dict[int, Node] = {}


class SuffixTree:
    def __init__(self, max_depth: int = 24):
        if max_depth < 1:
            raise ValueError(f"max_depth {max_depth}: must be at least 1")
        self.max_depth = max_depth
        self.root = Node()
        self.seqs: dict[Hashable, list[int]] = {}  # key -> its tokens, oldest key first (insertion order)
        self._growing: dict[Hashable, list[Node]] = {}  # key -> nodes of its suffixes of length 0 .. max_depth - 1

    @property
    def num_tokens(self) -> int:
        return self.root.count

    def append(self, key: Hashable, token: int) -> None:
        seq = self.seqs.setdefault(key, [])
        growing = self._growing.setdefault(key, [])
        seq.append(token)
        self.root.count += 1
        stepped = [self.root]
        for i, node in enumerate([self.root, *growing]):
            child = node.children.get(token)
            if child is None:
                child = node.children[token] = Node()
            child.count += 1
            if i + 1 < self.max_depth:  # a suffix of length max_depth stops growing
                stepped.append(child)
        self._growing[key] = stepped[1:]

    def extend(self, key: Hashable, tokens: Iterable[int]) -> None:
        for token in tokens:
            self.append(key, token)

    def remove(self, key: Hashable) -> None:
        """Subtract every substring of the sequence; nodes no other sequence holds are freed."""
        seq = self.seqs.pop(key)
        self._growing.pop(key)
        self.root.count -= len(seq)
        for start in range(len(seq)):
            node = self.root
            for token in seq[start : start + self.max_depth]:
                child = node.children[token]
                child.count -= 1
                if child.count == 0:  # its descendants on this path occur no more often: all gone
                    del node.children[token]
                    break
                node = child

    def find(self, pattern: Sequence[int]) -> Node | None:
        """The node of `pattern`, or None when it never occurred (or is longer than max_depth)."""
        node = self.root
        for token in pattern:
            node = node.children.get(token)
            if node is None:
                return None
        return node

    def matches(self, context: Sequence[int], max_len: int) -> list[Node]:
        """Nodes of the context's suffixes of length 1, 2, ... while they occur (every substring of an occurring
        one occurs too, so the first miss ends the list), at most max_len of them."""
        out = []
        for length in range(1, min(max_len, len(context), self.max_depth) + 1):
            node = self.find(context[len(context) - length :])
            if node is None:
                break
            out.append(node)
        return out
