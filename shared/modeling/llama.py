"""Our own forward for the Llama family over the paged KV cache.

Parameter names follow the HF checkpoints (model.layers.N.self_attn.q_proj ...) so loading is a rename-free copy,
except that q/k/v and gate/up are fused into one matmul each at load time: on small models per-call overhead, not
FLOPs, sets the step time.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from specrelay.kernels.dispatch import runtime_uses_triton
from specrelay.kernels.tree_attention import tree_attention
from specrelay.shared.modeling.batch import ForwardBatch
from specrelay.shared.modeling.config import ModelConfig
from specrelay.shared.modeling.kv_cache import PagedKVCache
from specrelay.shared.modeling.rope import apply_rope, inv_frequencies, rope_cos_sin


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.q_size, self.kv_size = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        self.qkv_proj = nn.Linear(cfg.hidden_size, self.q_size + 2 * self.kv_size, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(self.q_size, cfg.hidden_size, bias=cfg.o_bias)
        self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps) if cfg.qk_norm else None
        self.scale = cfg.head_dim**-0.5
        self.window = cfg.layer_windows[layer]  # 0: full attention

    def qkv(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """x: [num_tokens, hidden] (normed) -> q [num_tokens, H, D], k and v [num_tokens, H_kv, D], RoPE applied."""
        qkv = self.qkv_proj(x)
        v = qkv[:, self.q_size + self.kv_size :].view(-1, self.num_kv_heads, self.head_dim)  # [num_tokens, H_kv, D]
        if self.q_norm is not None:
            q, k = qkv[:, : self.q_size + self.kv_size].split([self.q_size, self.kv_size], dim=-1)
            q = apply_rope(self.q_norm(q.view(-1, self.num_heads, self.head_dim)), cos, sin)
            k = apply_rope(self.k_norm(k.view(-1, self.num_kv_heads, self.head_dim)), cos, sin)
        else:  # one rotation for the query and key heads together: per-op overhead, not FLOPs, is the cost here
            qk = apply_rope(qkv[:, : self.q_size + self.kv_size].view(-1, self.num_heads + self.num_kv_heads,
                                                                      self.head_dim), cos, sin)
            q, k = qk[:, : self.num_heads], qk[:, self.num_heads :]  # [num_tokens, H, D], [num_tokens, H_kv, D]
        return q, k, v

    def attend(self, q: torch.Tensor, batch: ForwardBatch, cache: PagedKVCache) -> torch.Tensor:
        """Attention of q [num_tokens, H, D] over this layer's cache (K/V already written), through o_proj."""
        assert not self.window or batch.window == self.window, f"batch window {batch.window}, layer's {self.window}"
        out = attention(q, cache.k[self.layer], cache.v[self.layer], batch, self.scale, self.window)
        return self.o_proj(out.reshape(-1, self.q_size))


# A row hook (relay prefill, services/verifier/relay.py) sees one layer's fresh Q/K/V of the rows in x before any
# is written: (layer, q, k, v) -> (the rows of x that go on through attention and the MLP, None: all; the batch
# they attend with). It writes the K/V it keeps itself (write_kv), so a row can stop after writing its K/V.
RowHook = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], tuple["torch.Tensor | None", ForwardBatch]]


def write_kv(k: torch.Tensor, v: torch.Tensor, cache: PagedKVCache, layer: int, slots: torch.Tensor) -> None:
    """k, v: [num_tokens, H_kv, D] into one layer's cache at `slots` [num_tokens]."""
    num_kv_heads, head_dim = cache.k.shape[3:]
    cache.k[layer].view(-1, num_kv_heads, head_dim).index_copy_(0, slots, k)
    cache.v[layer].view(-1, num_kv_heads, head_dim).index_copy_(0, slots, v)


def attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, batch: ForwardBatch, scale: float,
              window: int) -> torch.Tensor:
    """Attend over each sequence's cached keys as `batch` masks them: the Triton kernel on CUDA, else torch.

    q: [num_tokens, H, D]; k_cache, v_cache: [num_blocks, block_size, H_kv, D] -> [num_tokens, H, D]
    """
    if runtime_uses_triton(q):
        tree_mask = batch.window_tree_mask if window else batch.tree_mask
        return tree_attention(q, k_cache, v_cache, batch.block_tables, batch.context_lens, batch.cu_query_lens,
                              tree_mask, scale, batch.query_index.shape[1], batch.mask_starts, window=window,
                              positions=batch.positions)  # fmt: skip
    return paged_attention(q, k_cache, v_cache, batch, scale, windowed=window > 0)


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, batch: ForwardBatch,
                    scale: float, windowed: bool = False) -> torch.Tensor:
    """The torch path: gather each sequence's blocks, pad the queries, one SDPA call with the batch mask (cut to
    the sliding window when `windowed`); a decode step (one query per sequence) takes `decode_attention`.

    q: [num_tokens, H, D]; k_cache, v_cache: [num_blocks, block_size, H_kv, D] -> [num_tokens, H, D]
    """
    attn_mask = batch.window_attn_mask if windowed else batch.attn_mask
    assert attn_mask is not None, "a windowed layer needs a batch built with its window"
    num_seqs = batch.block_tables.shape[0]
    if q.shape[0] == num_seqs and batch.query_index.shape[1] == 1:
        return decode_attention(q, k_cache, v_cache, batch, scale, windowed)
    keys, values = (_gather(cache, batch.block_tables)[:, : batch.max_kv_len].transpose(1, 2)
                    for cache in (k_cache, v_cache))  # [num_seqs, H_kv, max_kv_len, D]
    queries = q[batch.query_index].transpose(1, 2)  # [num_seqs, H, max_query_len, D]
    out = F.scaled_dot_product_attention(queries, keys, values, attn_mask=attn_mask, scale=scale,
                                         enable_gqa=q.shape[1] != k_cache.shape[2])
    return out.transpose(1, 2)[batch.query_valid]  # [num_tokens, H, D]


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, batch: ForwardBatch,
                     scale: float, windowed: bool = False) -> torch.Tensor:
    """One query per sequence. The G = H / H_kv query heads that share a KV head become that head's G query rows
    (q viewed as [num_seqs, H_kv, G, D]), so grouped-query attention is plain attention over the gathered keys:
    no copy of K/V per query head, and no extra FLOPs.

    q: [num_seqs, H, D] -> [num_seqs, H, D]
    """
    num_seqs, num_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[2]
    attn_mask = batch.window_attn_mask if windowed else batch.attn_mask  # [num_seqs, 1, 1, max_kv_len]
    keys, values = (_gather(cache, batch.block_tables)[:, : batch.max_kv_len].transpose(1, 2)
                    for cache in (k_cache, v_cache))  # [num_seqs, H_kv, max_kv_len, D]
    queries = q.view(num_seqs, num_kv_heads, num_heads // num_kv_heads, head_dim)  # [num_seqs, H_kv, G, D]
    out = F.scaled_dot_product_attention(queries, keys, values, attn_mask=attn_mask, scale=scale)
    return out.view(num_seqs, num_heads, head_dim)


def _gather(cache: torch.Tensor, block_tables: torch.Tensor) -> torch.Tensor:
    """[num_blocks, block_size, H_kv, D] -> [num_seqs, max_blocks · block_size, H_kv, D]: each sequence's blocks
    in order (padding blocks included; masks cut them). index_select copies whole blocks, the cheapest gather."""
    num_seqs, max_blocks = block_tables.shape
    blocks = cache.index_select(0, block_tables.flatten())
    return blocks.view(num_seqs, max_blocks * cache.shape[1], *cache.shape[2:])


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.intermediate = cfg.intermediate_size
        self.gate_up_proj = nn.Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=cfg.mlp_bias)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=cfg.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).split(self.intermediate, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.self_attn = Attention(cfg, layer)
        self.mlp = MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, batch: ForwardBatch,
                cache: PagedKVCache, rows: RowHook | None = None) -> torch.Tensor:
        """x: [num_tokens, hidden] -> [num_tokens, hidden], or the rows that `rows` keeps (cos, sin: x's rows)."""
        attn = self.self_attn
        q, k, v = attn.qkv(self.input_layernorm(x), cos, sin)
        if rows is None:
            write_kv(k, v, cache, attn.layer, batch.slot_mapping)
        else:
            keep, batch = rows(attn.layer, q, k, v)
            if keep is not None:
                x, q = x[keep], q[keep]
        x = x + attn.attend(q, batch, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class DecoderStack(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class LlamaForCausalLM(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.model = DecoderStack(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.register_buffer("inv_freq", inv_frequencies(cfg), persistent=False)

    @property
    def device(self) -> torch.device:
        return self.lm_head.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.lm_head.weight.dtype

    def make_cache(self, num_blocks: int, block_size: int = 16) -> PagedKVCache:
        cfg = self.config
        return PagedKVCache(cfg.num_layers, num_blocks, block_size, cfg.num_kv_heads, cfg.head_dim,
                            dtype=self.dtype, device=self.device)

    @torch.inference_mode()
    def forward(self, batch: ForwardBatch, cache: PagedKVCache) -> torch.Tensor:
        """Writes the new tokens' K/V into `cache` and returns float32 logits [num_logits, vocab] for the rows
        `batch.logits_indices`."""
        return self.forward_hidden(batch, cache)[0]

    @torch.inference_mode()
    def forward_hidden(self, batch: ForwardBatch, cache: PagedKVCache) -> tuple[torch.Tensor, torch.Tensor]:
        """As `forward`, plus the last layer's normed hidden states of those rows [num_logits, hidden] (what the
        LM head reads): the feature an EAGLE-style draft head continues from."""
        x = self.model.embed_tokens(batch.input_ids)  # [num_tokens, hidden]
        cos, sin = rope_cos_sin(self.inv_freq, batch.positions, x.dtype)
        for layer in self.model.layers:
            x = layer(x, cos, sin, batch, cache)
        x = self.model.norm(x[batch.logits_indices])
        return self.lm_head(x).float(), x
