"""Verify step of a 64-node tree against a 1-token decode step, on a 1B-class Llama with random weights.

The model is the shape of Llama 3.2 1B (random bf16 weights, tied embeddings) written as plain torch matmuls
around `tree_attention` and the paged KV cache, so the two steps differ only in how many tokens go through
(`RandomLlama.step` is the hook: the engine's runner can stand in for it once it runs on CUDA). The same step
with the kernels and with the torch references gives the GPU parity check: greedy tokens (argmax at every tree
node) must agree.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Callable

import torch

from specrelay.kernels.dispatch import set_kernel_mode
from specrelay.shared.rotary import rope_cos_sin, rotate_half
from specrelay.kernels.tree_attention import tree_attention


@dataclass
class LlamaShapes:
    hidden: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    rope_theta: float


LLAMA_1B = LlamaShapes(2048, 16, 32, 8, 64, 8192, 128256, 500000.0)  # Llama 3.2 1B
TINY_LLAMA = LlamaShapes(64, 2, 4, 2, 16, 128, 256, 10000.0)


class RandomLlama:
    """Weights N(0, 0.02); a paged KV cache whose cached prefix holds random keys and values."""

    def __init__(self, shapes: LlamaShapes, device: torch.device, dtype: torch.dtype, num_blocks: int,
                 block_size: int):  # fmt: skip
        gen = torch.Generator(device=device).manual_seed(0)
        s = shapes
        qkv = (s.num_heads + 2 * s.num_kv_heads) * s.head_dim

        def w(*shape):
            return (torch.randn(shape, generator=gen, device=device, dtype=torch.float32) * 0.02).to(dtype)

        self.shapes, self.block_size = s, block_size
        self.embed = w(s.vocab, s.hidden)  # tied with the output projection
        self.w_qkv = [w(qkv, s.hidden) for _ in range(s.num_layers)]
        self.w_o = [w(s.hidden, s.num_heads * s.head_dim) for _ in range(s.num_layers)]
        self.w_gate_up = [w(2 * s.intermediate, s.hidden) for _ in range(s.num_layers)]
        self.w_down = [w(s.hidden, s.intermediate) for _ in range(s.num_layers)]
        cache = (s.num_layers, num_blocks, block_size, s.num_kv_heads, s.head_dim)
        self.k_cache = torch.randn(cache, generator=gen, device=device, dtype=torch.float32).to(dtype)
        self.v_cache = torch.randn(cache, generator=gen, device=device, dtype=torch.float32).to(dtype)
        self.inv_freq = 1.0 / s.rope_theta ** (torch.arange(0, s.head_dim, 2, device=device).float() / s.head_dim)

    def step(self, tokens, positions, slot_mapping, block_tables, context_lens, cu_query_lens, tree_mask,
             max_query_len: int) -> torch.Tensor:  # fmt: skip
        """One forward over the new tokens (their K/V land in the cache): logits [num_tokens, vocab]."""
        s = self.shapes
        num_tokens = tokens.numel()
        cos, sin = (t.to(self.embed.dtype)[:, None, :] for t in rope_cos_sin(self.inv_freq.float(), positions, torch.float32))
        x = self.embed[tokens]  # [num_tokens, hidden]
        for layer in range(s.num_layers):
            h = torch.nn.functional.rms_norm(x, (s.hidden,), eps=1e-5)
            q, k, v = (h @ self.w_qkv[layer].T).split(
                [s.num_heads * s.head_dim, s.num_kv_heads * s.head_dim, s.num_kv_heads * s.head_dim], dim=-1)
            q = q.view(num_tokens, s.num_heads, s.head_dim)
            k = k.view(num_tokens, s.num_kv_heads, s.head_dim)
            q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
            self.k_cache[layer].view(-1, s.num_kv_heads, s.head_dim).index_copy_(0, slot_mapping, k)
            self.v_cache[layer].view(-1, s.num_kv_heads, s.head_dim).index_copy_(
                0, slot_mapping, v.view(num_tokens, s.num_kv_heads, s.head_dim))
            attn = tree_attention(q, self.k_cache[layer], self.v_cache[layer], block_tables, context_lens,
                                  cu_query_lens, tree_mask, s.head_dim**-0.5, max_query_len=max_query_len)  # fmt: skip
            x = x + attn.flatten(1) @ self.w_o[layer].T
            gate, up = (torch.nn.functional.rms_norm(x, (s.hidden,), eps=1e-5) @ self.w_gate_up[layer].T).chunk(2, -1)
            x = x + (torch.nn.functional.silu(gate) * up) @ self.w_down[layer].T
        return torch.nn.functional.rms_norm(x, (s.hidden,), eps=1e-5) @ self.embed.T


def step_inputs(model: RandomLlama, num_seqs: int, context_len: int, query_len: int, tree: bool,
                device: torch.device) -> dict:  # fmt: skip
    """Request r owns blocks [r·blocks_per_seq, (r+1)·blocks_per_seq); its new tokens follow its context."""
    bs = model.block_size
    blocks_per_seq = math.ceil((context_len + query_len) / bs)
    block_tables = torch.arange(num_seqs * blocks_per_seq, dtype=torch.int32).view(num_seqs, blocks_per_seq)
    positions = (context_len + torch.arange(query_len)).repeat(num_seqs)
    seq_of = torch.arange(num_seqs).repeat_interleave(query_len)
    slot_mapping = block_tables[seq_of, positions // bs].long() * bs + positions % bs
    gen = torch.Generator().manual_seed(num_seqs)
    tree_mask = None
    if tree:  # each node's parent is one of the 4 nodes before it: a bushy tree several levels deep
        tree_mask = torch.eye(query_len, dtype=torch.bool)
        for i in range(1, query_len):
            tree_mask[i] |= tree_mask[max(0, i - 1 - int(torch.randint(0, min(i, 4), (1,), generator=gen)))]
        tree_mask = tree_mask.repeat(num_seqs, 1)
    inputs = dict(tokens=torch.randint(0, model.shapes.vocab, (num_seqs * query_len,), generator=gen),
                  positions=positions, slot_mapping=slot_mapping, block_tables=block_tables,
                  context_lens=torch.full((num_seqs,), context_len, dtype=torch.int32),
                  cu_query_lens=torch.arange(0, num_seqs * query_len + 1, query_len, dtype=torch.int32),
                  tree_mask=tree_mask)  # fmt: skip
    return dict({k: (v.to(device) if v is not None else None) for k, v in inputs.items()}, max_query_len=query_len)


def graphed(fn: Callable[[], torch.Tensor], device: torch.device) -> tuple[Callable[[], object], str]:
    """A CUDA-graph replay of fn when capture works (launch overhead out of the comparison), else fn itself."""
    if device.type != "cuda":
        return fn, "eager (cpu)"
    try:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(3):
                fn()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        return graph.replay, "cuda graph"
    except Exception as e:
        return fn, f"eager (graph capture failed: {type(e).__name__}: {str(e)[:120]})"


def run_model_bench(device: torch.device, shapes: LlamaShapes, batches: tuple[int, ...], context_len: int,
                    tree_nodes: int, block_size: int, warmup: int, iters: int,
                    time_ms: Callable[..., float]) -> dict:  # fmt: skip
    from specrelay.kernels.dispatch import use_triton

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    blocks_per_seq = math.ceil((context_len + tree_nodes) / block_size)
    model = RandomLlama(shapes, device, dtype, max(batches) * blocks_per_seq, block_size)
    rows, parity = [], []
    with torch.inference_mode():
        for num_seqs in batches:
            verify = step_inputs(model, num_seqs, context_len, tree_nodes, True, device)
            decode = step_inputs(model, num_seqs, context_len, 1, False, device)
            verify_fn, mode = graphed(lambda: model.step(**verify), device)
            decode_fn, _ = graphed(lambda: model.step(**decode), device)
            verify_ms = time_ms(verify_fn, device, warmup, iters)
            decode_ms = time_ms(decode_fn, device, warmup, iters)
            rows.append({"num_seqs": num_seqs, "verify_ms": round(verify_ms, 4), "decode_ms": round(decode_ms, 4),
                         "ratio": round(verify_ms / decode_ms, 3), "timing": mode})  # fmt: skip
            parity.append(_parity(model, verify))
    return {
        "model": "Llama 3.2 1B shapes" if shapes == LLAMA_1B else "tiny Llama (smoke run)",
        "shapes": asdict(shapes), "dtype": str(dtype).removeprefix("torch."), "context_len": context_len,
        "tree_nodes": tree_nodes, "attention": "triton" if use_triton(model.k_cache) else "torch reference",
        "batches": rows, "ratio": rows[0]["ratio"], "parity": parity,
    }  # fmt: skip


def _parity(model: RandomLlama, inputs: dict) -> dict:
    """Greedy tokens at every tree node with the kernels and with the torch references (same cache contents)."""
    try:
        set_kernel_mode("triton")
        with_kernels = model.step(**inputs).float()
    except Exception as e:
        return {"checked": False, "reason": f"kernels cannot run here: {type(e).__name__}: {e}"[:300]}
    finally:
        set_kernel_mode(None)
    set_kernel_mode("torch")
    try:
        with_torch = model.step(**inputs).float()
    finally:
        set_kernel_mode(None)
    agree = (with_kernels.argmax(-1) == with_torch.argmax(-1)).float().mean().item()
    scale = with_torch.abs().max().item()
    return {"checked": True, "num_seqs": int(inputs["context_lens"].numel()), "greedy_token_agreement": agree,
            "max_abs_logit_diff": float(f"{(with_kernels - with_torch).abs().max().item():.4g}"),
            "max_abs_logit": float(f"{scale:.4g}")}  # fmt: skip
