"""A token tree verified in one forward gives every node the logits of its own root-to-node path."""

import random

import torch

from specrelay.shared.draft_tree import DraftTree
from specrelay.shared.modeling.kv_cache import BlockTable
from specrelay.shared.modeling.loader import load_model
from specrelay.shared.modeling.runner import ModelRunner, StepInput

from .conftest import VOCAB


def random_tree(rng: random.Random, levels: int = 3) -> list[int]:
    """parents[i] < i; node 0 is the root; every level has 1-3 children per node."""
    parents, frontier = [-1], [0]
    for _ in range(levels):
        nxt = []
        for node in frontier:
            for _ in range(rng.randint(1, 3)):
                parents.append(node)
                nxt.append(len(parents) - 1)
        frontier = nxt
    return parents


def path_to(parents: list[int], node: int) -> list[int]:
    path = []
    while node >= 0:
        path.append(node)
        node = parents[node]
    return path[::-1]


def test_tree_logits_equal_each_path_alone(hf_model_dirs):
    path, _ = hf_model_dirs["qwen3"]
    runner = ModelRunner(load_model(path), num_blocks=64, block_size=8)
    rng = random.Random(0)
    prompt = [rng.randrange(VOCAB) for _ in range(21)]
    parents = random_tree(rng)
    tokens = [rng.randrange(VOCAB) for _ in parents]
    depth = [len(path_to(parents, i)) - 1 for i in range(len(parents))]

    tree_table = BlockTable()
    runner.prefill(tree_table, prompt)
    tree_logits = runner.forward([StepInput(tree_table, tokens, positions=[21 + d for d in depth],
                                            tree_mask=DraftTree(tokens, parents, [1.0] * len(parents)).ancestor_mask(),
                                            logits_rows=list(range(len(tokens))))])[0]
    for node in range(len(parents)):
        table = BlockTable()
        runner.prefill(table, prompt)
        alone = runner.forward([StepInput(table, [tokens[i] for i in path_to(parents, node)])])[0][-1]
        runner.release(table)
        assert (tree_logits[node] - alone).abs().max().item() <= 1e-4, f"node {node}"


def test_trees_of_several_sequences_in_one_forward(hf_model_dirs):
    """Ragged batch: two trees and a plain decode step share a forward without seeing each other."""
    path, _ = hf_model_dirs["llama"]
    runner = ModelRunner(load_model(path), num_blocks=64, block_size=8)
    rng = random.Random(1)
    prompts = [[rng.randrange(VOCAB) for _ in range(n)] for n in (9, 30, 17)]
    trees = [random_tree(rng, 2), [-1], random_tree(rng, 3)]
    tokens = [[rng.randrange(VOCAB) for _ in t] for t in trees]

    def step(table: BlockTable, s: int) -> StepInput:
        positions = [len(prompts[s]) + len(path_to(trees[s], i)) - 1 for i in range(len(trees[s]))]
        return StepInput(table, tokens[s], positions=positions, tree_mask=DraftTree(tokens[s], trees[s], [1.0] * len(trees[s])).ancestor_mask(),
                         logits_rows=list(range(len(trees[s]))))

    together = [BlockTable() for _ in prompts]
    for table, prompt in zip(together, prompts):
        runner.prefill(table, prompt)
    batched = runner.forward([step(table, s) for s, table in enumerate(together)])
    for s in range(3):
        table = BlockTable()
        runner.prefill(table, prompts[s])
        alone = runner.forward([step(table, s)])[0]
        assert (batched[s] - alone).abs().max().item() <= 1e-4
