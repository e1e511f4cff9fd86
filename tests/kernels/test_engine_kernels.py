"""The runtime's kernel path end to end: with SPECRELAY_KERNELS=triton (here under the interpreter) the model's
attention runs `tree_attention` and the engine's KV compaction `kv_compact_`; speculative greedy output must equal
the torch path token for token. On CUDA `auto` picks the same path (tests/kernels/test_gpu.py)."""

from __future__ import annotations

from unittest import mock

import pytest
import torch

from specrelay.kernels import kv_compact, tree_attention
from specrelay.kernels.dispatch import runtime_uses_triton, set_kernel_mode
from specrelay.services.drafter.draft_model import DraftModelProposer
from specrelay.services.verifier.engine import SpecEngine
from specrelay.shared.modeling.loader import load_model
from specrelay.shared.modeling.runner import ModelRunner
from specrelay.shared.sampling import SamplingParams

from ..conftest import save_tiny_llama


def _generate(target, draft, prompts):
    engine = SpecEngine(ModelRunner(target, num_blocks=64),
                        DraftModelProposer(ModelRunner(draft, num_blocks=64), max_depth=3, branch=2, width=2),
                        max_nodes=6)
    reqs = engine.generate(prompts, SamplingParams(max_tokens=12))
    return [r.output for r in reqs], sum(r.stats.accepted_tokens for r in reqs)


def test_auto_keeps_cpu_forwards_on_torch_even_under_the_interpreter():
    # the interpreter is on in this folder: `use_triton` says yes, the runtime must still say no in auto
    assert not runtime_uses_triton(torch.zeros(1))
    set_kernel_mode("torch")
    assert not runtime_uses_triton(torch.zeros(1))
    set_kernel_mode("triton")
    assert runtime_uses_triton(torch.zeros(1))


def test_kernel_path_greedy_equals_torch_path(tmp_path):
    model_dir = save_tiny_llama(tmp_path / "t", seed=3, num_attention_heads=4, num_key_value_heads=1)  # GQA 4
    target, draft = load_model(model_dir), load_model(model_dir)
    gen = torch.Generator().manual_seed(4)
    with torch.no_grad():  # a draft close to the target: long accepted paths, which the tree stores out of order
        for p in draft.parameters():
            p.add_(0.01 * torch.randn(p.shape, generator=gen))
    # block boundaries: prompts of 5 and 21 tokens straddle the 16-token blocks
    prompts = [torch.randint(0, 101, (n,), generator=gen).tolist() for n in (5, 21)]

    set_kernel_mode("torch")
    expected, _ = _generate(target, draft, prompts)

    set_kernel_mode("triton")
    attn = mock.patch.object(tree_attention, "tree_attention_triton", wraps=tree_attention.tree_attention_triton)
    compact = mock.patch("specrelay.shared.modeling.kv_cache.kv_compact_triton_",
                         wraps=kv_compact.kv_compact_triton_)
    with attn as attn_calls, compact as compact_calls:
        got, accepted = _generate(target, draft, prompts)
    assert got == expected
    assert attn_calls.call_count > 0, "the model's attention did not run the kernel"
    assert accepted > 0, "nothing accepted: the test would not exercise acceptance"
    assert compact_calls.call_count > 0, "no accepted path was compacted by the kernel"
