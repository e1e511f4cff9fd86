"""ForwardBatch: the typed handoff from whoever schedules a forward (runner, verifier) to the model.

A forward runs the *new* tokens of several sequences at once (ragged). Each sequence has `context_len` tokens already
in the paged cache; its new tokens are written at logical positions context_len .. context_len + query_len - 1 and
attend to the whole cached context plus the new tokens their mask allows: causal for prefill and decode, ancestors
only for a token tree (SpecInfer's tree attention). Positions are explicit, so a tree node sits at context_len + its
depth even though its KV slot is elsewhere. Layers under a sliding window get the same masks cut to the window (keys
before a mask by their index, a mask's own keys by kernels/tree_attention.window_mask), built once here for all.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from specrelay.kernels.tree_attention import window_mask


@dataclass
class ForwardBatch:
    input_ids: torch.Tensor  # [num_tokens] the new tokens of all sequences, sequence by sequence
    positions: torch.Tensor  # [num_tokens] RoPE positions
    slot_mapping: torch.Tensor  # [num_tokens] cache slot that receives each new token's K/V
    block_tables: torch.Tensor  # [num_seqs, max_blocks] int32, padded with block 0 (masked out)
    context_lens: torch.Tensor  # [num_seqs] int32, tokens cached before this forward
    cu_query_lens: torch.Tensor  # [num_seqs + 1] int32, prefix sums of new tokens per sequence
    tree_mask: torch.Tensor | None  # [num_tokens, mask_width] bool, row i: keys from its mask start it sees
    masks_context: bool  # some sequence masks cached tokens too (a drafter growing a tree over several forwards)
    mask_starts: torch.Tensor | None  # [num_seqs] int32 key position of tree_mask's column 0; None: context_lens
    logits_indices: torch.Tensor  # [num_logits] rows of the new tokens whose logits the caller wants
    # Derived once per forward for the torch attention path (shared by every layer):
    query_index: torch.Tensor  # [num_seqs, max_query_len] row in input_ids of each padded query (pads -> 0)
    query_valid: torch.Tensor  # [num_seqs, max_query_len] bool
    attn_mask: torch.Tensor  # [num_seqs, 1, max_query_len, max_kv_len] bool, True = may attend
    max_kv_len: int
    window: int = 0  # the sliding window of the windowed layers (ModelConfig.sliding_window); 0: none
    window_tree_mask: torch.Tensor | None = None  # tree_mask cut to the window, for the windowed layers
    window_attn_mask: torch.Tensor | None = None  # attn_mask cut to the window

    @property
    def num_seqs(self) -> int:
        return self.context_lens.shape[0]

    @classmethod
    def build(cls, token_ids: list[list[int]], context_lens: list[int], slots: list[list[int]],
              block_tables: list[list[int]], positions: list[list[int]] | None = None,
              tree_masks: list[torch.Tensor | None] | None = None, mask_starts: list[int | None] | None = None,
              logits_rows: list[list[int]] | None = None, window: int = 0,
              device: str | torch.device = "cpu") -> ForwardBatch:
        """token_ids[s]: new tokens of sequence s; slots[s]: their cache slots; tree_masks[s]: None (causal) or
        [n_s, context_len - mask_start + n_s] bool over the cached tokens from mask_starts[s] (default:
        context_len, i.e. the mask covers only the new tokens) and the new tokens; positions[s]: default
        context_len + arange; logits_rows[s]: sequence-local rows wanting logits (default: the last new token);
        window: the sliding window of the model's windowed layers (0: none)."""
        num_seqs = len(token_ids)
        query_lens = [len(t) for t in token_ids]
        max_q = max(max(query_lens), 1)
        cu = [0]
        for n in query_lens:
            cu.append(cu[-1] + n)
        if positions is None:
            positions = [list(range(c, c + n)) for c, n in zip(context_lens, query_lens)]
        kv_lens = [c + n for c, n in zip(context_lens, query_lens)]
        max_kv = max(max(kv_lens), 1)
        max_blocks = max(max((len(b) for b in block_tables), default=1), 1)
        tables = torch.zeros(num_seqs, max_blocks, dtype=torch.int32)
        for s, blocks in enumerate(block_tables):
            tables[s, : len(blocks)] = torch.tensor(blocks, dtype=torch.int32)

        query_index = torch.zeros(num_seqs, max_q, dtype=torch.int64)
        query_valid = torch.zeros(num_seqs, max_q, dtype=torch.bool)
        attn_mask = torch.zeros(num_seqs, 1, max_q, max_kv, dtype=torch.bool)
        any_tree = tree_masks is not None and any(m is not None for m in tree_masks)
        starts = [c if mask_starts is None or mask_starts[s] is None else mask_starts[s]
                  for s, c in enumerate(context_lens)]
        masks_context = any(start < c for start, c in zip(starts, context_lens))
        width = max(c + n - start for c, n, start in zip(context_lens, query_lens, starts)) if masks_context else max_q
        flat_tree = torch.zeros(cu[-1], max(width, 1), dtype=torch.bool) if any_tree else None
        window_attn = torch.zeros_like(attn_mask) if window else None
        window_tree = torch.zeros_like(flat_tree) if window and flat_tree is not None else None

        def place(s: int, attn: torch.Tensor, tree: torch.Tensor | None, prefix: torch.Tensor | bool,
                  mask: torch.Tensor) -> None:
            c, n, start = context_lens[s], query_lens[s], starts[s]
            attn[s, 0, :n, :start] = prefix
            attn[s, 0, :n, start : c + n] = mask
            attn[s, 0, n:, 0] = True  # padded query rows attend somewhere so softmax stays finite
            if tree is not None:
                tree[cu[s] : cu[s] + n, : c + n - start] = mask if masks_context else mask[:, mask.shape[1] - n :]

        for s in range(num_seqs):
            n = query_lens[s]
            query_index[s, :n] = torch.arange(cu[s], cu[s] + n)
            query_valid[s, :n] = True
            mask = tree_masks[s] if tree_masks is not None else None
            if mask is None:
                mask = torch.ones(n, n, dtype=torch.bool).tril()
            place(s, attn_mask, flat_tree, True, mask)
            if window:  # cached keys before the mask sit at their index; the mask's own keys are cut by rank
                query_pos = torch.tensor(positions[s], dtype=torch.int64)
                near = torch.arange(starts[s])[None, :] > query_pos[:, None] - window
                place(s, window_attn, window_tree, near, window_mask(mask, window))
        rows = logits_rows if logits_rows is not None else [[n - 1] if n else [] for n in query_lens]
        logits_indices = [cu[s] + r for s in range(num_seqs) for r in rows[s]]

        def t(x, dtype=torch.int64):
            return torch.tensor(x, dtype=dtype, device=device)

        return cls(
            input_ids=t([tok for seq in token_ids for tok in seq]),
            positions=t([p for seq in positions for p in seq]),
            slot_mapping=t([x for seq in slots for x in seq]),
            block_tables=tables.to(device),
            context_lens=t(context_lens, torch.int32),
            cu_query_lens=t(cu, torch.int32),
            tree_mask=None if flat_tree is None else flat_tree.to(device),
            masks_context=masks_context,
            mask_starts=t(starts, torch.int32) if masks_context else None,
            logits_indices=t(logits_indices),
            query_index=query_index.to(device),
            query_valid=query_valid.to(device),
            attn_mask=attn_mask.to(device),
            max_kv_len=max_kv,
            window=window,
            window_tree_mask=None if window_tree is None else window_tree.to(device),
            window_attn_mask=None if window_attn is None else window_attn.to(device),
        )
