"""Sliding-window attention against transformers, far past the window: Mistral (every layer windowed) and Qwen2 with
use_sliding_window (only the layers from max_window_layers on). Logits of chunked prefill and decode, greedy
generation, and speculative decoding (chain, deep tree, recycling drafts) equal to the target's own greedy output."""

from __future__ import annotations

import pytest
import torch

from specrelay.services.drafter.draft_model import DraftModelProposer
from specrelay.services.drafter.recycling import TokenRecyclingProposer
from specrelay.services.verifier.engine import SpecEngine
from specrelay.shared.errors import ModelLoadError
from specrelay.shared.modeling.config import ModelConfig
from specrelay.shared.modeling.kv_cache import BlockTable
from specrelay.shared.modeling.loader import load_model
from specrelay.shared.modeling.runner import ModelRunner, StepInput
from specrelay.shared.sampling import SamplingParams

from .conftest import COMMON, VOCAB, save_models

WINDOW = 8
CHUNK = 16  # prefill chunks: the window crosses chunk (and 16-token block) boundaries
FAMILIES = ["mistral", "qwen2-window"]


@pytest.fixture(scope="module")
def windowed(tmp_path_factory):
    """family -> (directory, transformers model in eval mode)."""
    from transformers import MistralConfig, Qwen2Config

    configs = {
        "mistral": MistralConfig(**COMMON, sliding_window=WINDOW),
        # 2 layers, max_window_layers 1: layer 0 attends to everything, layer 1 to the window
        "qwen2-window": Qwen2Config(**COMMON, use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1),
    }
    return save_models(tmp_path_factory, configs, first_seed=2000)


def ignore_window(model) -> None:
    """What a runtime without sliding-window attention would compute: every layer attends to everything."""
    for layer in model.model.layers:
        layer.self_attn.window = 0


def test_config_reads_windows_as_transformers_does(windowed):
    mistral = ModelConfig.from_dir(windowed["mistral"][0])
    qwen2 = ModelConfig.from_dir(windowed["qwen2-window"][0])
    assert (mistral.sliding_window, mistral.layer_windows) == (WINDOW, (WINDOW, WINDOW))
    assert (qwen2.sliding_window, qwen2.layer_windows) == (WINDOW, (0, WINDOW))
    assert mistral.max_model_len == qwen2.max_model_len == COMMON["max_position_embeddings"]  # no cap at the window

    raw = dict(model_type="qwen2", vocab_size=10, hidden_size=8, intermediate_size=8, num_hidden_layers=3,
               num_attention_heads=2, sliding_window=4, max_window_layers=1)
    assert ModelConfig.from_dict(raw).layer_windows == (0, 0, 0)  # use_sliding_window is off
    assert ModelConfig.from_dict({**raw, "use_sliding_window": True}).layer_windows == (0, 4, 4)
    types = ["sliding_attention", "full_attention", "sliding_attention"]
    assert ModelConfig.from_dict({**raw, "use_sliding_window": True, "layer_types": types}).layer_windows == (4, 0, 4)
    assert ModelConfig.from_dict({**raw, "model_type": "llama"}).sliding_window is None
    with pytest.raises(ModelLoadError, match="layer_types"):
        ModelConfig.from_dict({**raw, "use_sliding_window": True, "layer_types": ["sliding_attention"]})
    with pytest.raises(ModelLoadError, match="sliding_window must be a positive"):
        ModelConfig.from_dict({**raw, "model_type": "mistral", "sliding_window": 0})


@pytest.mark.parametrize("family", FAMILIES)
def test_chunked_prefill_and_decode_logits_match_transformers(family, windowed):
    """67 prompt tokens in 16-token chunks, then 40 decode steps: 13x the window."""
    path, hf = windowed[family]
    ids = torch.randint(0, VOCAB, (107,), generator=torch.Generator().manual_seed(7)).tolist()
    with torch.no_grad():
        expected = hf(torch.tensor([ids])).logits[0]  # [107, vocab]

    def ours(model) -> torch.Tensor:
        runner, table, rows = ModelRunner(model, num_blocks=32, block_size=16), BlockTable(), []
        for start in range(0, 67, CHUNK):
            chunk = ids[start : min(start + CHUNK, 67)]
            rows.append(runner.forward([StepInput(table, chunk, logits_rows=list(range(len(chunk))))])[0])
        rows += [runner.forward([StepInput(table, [tok])])[0] for tok in ids[67:]]
        return torch.cat(rows)

    model = load_model(path)
    assert (ours(model) - expected).abs().max().item() <= 1e-4
    ignore_window(model)
    assert (ours(model)[WINDOW:] - expected[WINDOW:]).abs().max().item() > 1e-2  # the window matters here


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_tokens_equal_transformers_generate(family, windowed):
    path, hf = windowed[family]
    prompt = torch.randint(0, VOCAB, (37,), generator=torch.Generator().manual_seed(3)).tolist()
    theirs = hf.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=64,
                         attention_mask=torch.ones(1, 37, dtype=torch.long))[0, 37:].tolist()
    model = load_model(path)

    def ours() -> list[int]:
        runner = ModelRunner(model, num_blocks=32, prefill_chunk=CHUNK)
        return runner.generate([prompt], SamplingParams(max_tokens=64))[0]

    assert ours() == theirs
    ignore_window(model)
    assert ours() != theirs


@pytest.mark.parametrize("family", FAMILIES)
def test_tree_deeper_than_the_window_gives_each_node_its_path_logits(family, windowed):
    """One verify forward over a 24-node tree about 12 deep: each node's logits equal those of its own root-to-node
    path run as plain tokens (which the parity tests tie to transformers), so ancestors past the window drop out."""
    model = load_model(windowed[family][0])
    runner = ModelRunner(model, num_blocks=64, block_size=16, prefill_chunk=CHUNK)
    gen = torch.Generator().manual_seed(9)
    prompt = torch.randint(0, VOCAB, (21,), generator=gen).tolist()
    parents = [-1] + [max(0, i - 1 - int(torch.randint(2, (1,), generator=gen))) for i in range(1, 24)]
    tokens = torch.randint(0, VOCAB, (24,), generator=gen).tolist()
    paths = []
    for node in range(24):
        path, a = [], node
        while a >= 0:
            path, a = [a, *path], parents[a]
        paths.append(path)
    assert max(len(p) for p in paths) > WINDOW + 1
    mask = torch.zeros(24, 24, dtype=torch.bool)
    for node, path in enumerate(paths):
        mask[node, path] = True

    table = BlockTable()
    runner.prefill(table, prompt)
    tree_logits = runner.forward([StepInput(table, tokens, positions=[21 + len(p) - 1 for p in paths],
                                            tree_mask=mask, logits_rows=list(range(24)))])[0]  # fmt: skip
    for node, path in enumerate(paths):
        alone = BlockTable()
        runner.prefill(alone, prompt)
        want = runner.forward([StepInput(alone, [tokens[i] for i in path])])[0][-1]
        runner.release(alone)
        assert (tree_logits[node] - want).abs().max().item() <= 1e-4, f"node {node}"


@pytest.mark.parametrize("proposer", ["chain", "tree", "recycle"])
def test_speculative_greedy_equals_target_greedy_across_the_window(proposer, windowed):
    """The drafter is the target with noise (windowed too, growing its trees over cached levels); the tree
    proposer drafts 10 deep, past the window, so tree ancestors fall out of it as well as the prompt."""
    path, hf = windowed["mistral"]
    target, draft = load_model(path), load_model(path)
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in draft.parameters():
            p.add_(0.004 * torch.randn(p.shape, generator=gen))  # agrees often, not always
    prompts = []
    for n in (3, 9, 17, 30, 41):
        base = torch.randint(0, VOCAB, (max(2, n // 3),), generator=gen).tolist()
        prompts += [(base * 3)[:n], torch.randint(0, VOCAB, (n,), generator=gen).tolist()]
    params = SamplingParams(max_tokens=48)
    reference = ModelRunner(target, num_blocks=256, prefill_chunk=CHUNK).generate(prompts, params)
    last = prompts[-1]
    theirs = hf.generate(torch.tensor([last]), do_sample=False, max_new_tokens=48,
                         attention_mask=torch.ones(1, len(last), dtype=torch.long))[0, len(last) :]
    assert reference[-1] == theirs.tolist()
    drafter = ModelRunner(draft, num_blocks=512, prefill_chunk=CHUNK)
    make = {"chain": lambda: DraftModelProposer.chain(drafter, length=4),
            "tree": lambda: DraftModelProposer(drafter, max_depth=10, branch=2, width=2),
            "recycle": lambda: TokenRecyclingProposer(VOCAB, k=4)}[proposer]
    engine = SpecEngine(ModelRunner(target, num_blocks=512, prefill_chunk=CHUNK), make(), max_nodes=16)
    accepted = drafted = 0
    for start in range(0, len(prompts), 4):
        for i, req in enumerate(engine.generate(prompts[start : start + 4], params), start):
            assert req.output == reference[i], f"prompt {i} diverged"
            accepted, drafted = accepted + req.stats.accepted_tokens, drafted + req.stats.drafted_tokens
    assert 0 < accepted < drafted, "acceptance and rejection must both be exercised"
