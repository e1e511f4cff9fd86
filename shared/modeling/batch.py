"""ForwardBatch: the typed handoff from whoever schedules a forward (runner, verifier) to the model.

A forward runs the *new* tokens of several sequences at once (ragged). Each sequence has `context_len` tokens already
in the paged cache; its new tokens are written at logical positions context_len .. context_len + query_len - 1 and
attend to the whole cached context plus the new tokens their mask allows: causal for prefill and decode, ancestors
only for a token tree (SpecInfer's tree attention). Positions are explicit, so a tree node sits at context_len + its
depth even though its KV slot is elsewhere. Layers under a sliding window get the same masks cut to the window (keys
before a mask by their index, a mask's own keys by kernels/tree_attention.window_mask), built once here for all.
"""

from __future__ import annotations

import itertools
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
        shape = _Shape.of(token_ids, context_lens, mask_starts)
        masks = _tree_masks(tree_masks, shape)
        if masks is None and not window:
            attn_mask, flat_tree, window_attn, window_tree = _causal_mask(shape), None, None, None
        else:
            attn_mask, flat_tree, window_attn, window_tree = _masks_by_sequence(shape, masks, positions, window)
        rows = logits_rows if logits_rows is not None else [[n - 1] if n else [] for n in shape.query_lens]
        query_index, query_valid = _query_layout(shape)

        def t(x, dtype=torch.int64):
            return torch.tensor(x, dtype=dtype, device=device)

        def dev(x: torch.Tensor | None) -> torch.Tensor | None:
            return None if x is None else x.to(device)

        return cls(
            input_ids=t([tok for seq in token_ids for tok in seq]),
            positions=t([p for seq in positions for p in seq]) if positions is not None else
            _default_positions(shape).to(device),
            slot_mapping=t([x for seq in slots for x in seq]),
            block_tables=_block_tables(block_tables).to(device),
            context_lens=t(context_lens, torch.int32),
            cu_query_lens=t(shape.cu, torch.int32),
            tree_mask=dev(flat_tree),
            masks_context=shape.masks_context,
            mask_starts=t(shape.starts, torch.int32) if shape.masks_context else None,
            logits_indices=t([shape.cu[s] + r for s in range(shape.num_seqs) for r in rows[s]]),
            query_index=query_index.to(device),
            query_valid=query_valid.to(device),
            attn_mask=attn_mask.to(device),
            max_kv_len=shape.max_kv,
            window=window,
            window_tree_mask=dev(window_tree),
            window_attn_mask=dev(window_attn),
        )


Mask = torch.Tensor | None


@dataclass
class _Shape:
    """The sizes every mask of a batch is laid out by."""

    context_lens: list[int]
    query_lens: list[int]
    cu: list[int]  # prefix sums of query_lens, from 0
    starts: list[int]  # key position of each sequence's tree-mask column 0
    masks_context: bool
    max_q: int
    max_kv: int

    @property
    def num_seqs(self) -> int:
        return len(self.query_lens)

    @classmethod
    def of(cls, token_ids: list[list[int]], context_lens: list[int], mask_starts: list[int | None] | None) -> _Shape:
        query_lens = [len(t) for t in token_ids]
        starts = [c if mask_starts is None or mask_starts[s] is None else mask_starts[s]
                  for s, c in enumerate(context_lens)]
        return cls(list(context_lens), query_lens, [0, *itertools.accumulate(query_lens)], starts,
                   masks_context=any(start < c for start, c in zip(starts, context_lens)),
                   max_q=max(max(query_lens), 1), max_kv=max(max(c + n for c, n in zip(context_lens, query_lens)), 1))

    def width(self) -> int:
        """Columns of the flat tree mask: the widest mask over cached and new keys, or the longest query."""
        if not self.masks_context:
            return self.max_q
        return max(c + n - start for c, n, start in zip(self.context_lens, self.query_lens, self.starts))


def _tree_masks(tree_masks: list[torch.Tensor | None] | None, shape: _Shape) -> list[torch.Tensor | None] | None:
    """The masks that say more than causal, or None when none does. A one-token mask over no cached key (a
    draft tree that is only its root: plain decoding through the verifier) is the causal mask."""
    if tree_masks is None:
        return None
    masks = [None if m is not None and m.shape == (1, 1) and shape.starts[s] == shape.context_lens[s] and bool(m)
             else m for s, m in enumerate(tree_masks)]
    return masks if any(m is not None for m in masks) else None


def _causal_mask(shape: _Shape) -> torch.Tensor:
    """[num_seqs, 1, max_q, max_kv] bool: query i of sequence s sees keys 0 .. context_len + i; a padded query
    row sees key 0 only, so that its softmax stays finite."""
    ctx = torch.tensor(shape.context_lens)[:, None, None]
    n = torch.tensor(shape.query_lens)[:, None, None]
    query = torch.arange(shape.max_q)[None, :, None]
    key = torch.arange(shape.max_kv)[None, None, :]
    mask = torch.where(query < n, key <= ctx + query, key == 0)
    return mask[:, None]


def _masks_by_sequence(shape: _Shape, masks: list[torch.Tensor | None] | None, positions: list[list[int]] | None,
                       window: int) -> tuple[torch.Tensor, Mask, Mask, Mask]:
    """Tree masks and sliding windows, one sequence at a time: (attn_mask, flat tree mask, both cut to the
    window)."""
    attn_mask = torch.zeros(shape.num_seqs, 1, shape.max_q, shape.max_kv, dtype=torch.bool)
    flat_tree = torch.zeros(shape.cu[-1], max(shape.width(), 1), dtype=torch.bool) if masks is not None else None
    window_attn = torch.zeros_like(attn_mask) if window else None
    window_tree = torch.zeros_like(flat_tree) if window and flat_tree is not None else None
    for s in range(shape.num_seqs):
        c, n = shape.context_lens[s], shape.query_lens[s]
        mask = masks[s] if masks is not None else None
        if mask is None:
            mask = torch.ones(n, n, dtype=torch.bool).tril()
        _place(shape, s, attn_mask, flat_tree, True, mask)
        if window:  # cached keys before the mask sit at their index; the mask's own keys are cut by rank
            query_pos = torch.tensor(positions[s] if positions is not None else range(c, c + n), dtype=torch.int64)
            near = torch.arange(shape.starts[s])[None, :] > query_pos[:, None] - window
            _place(shape, s, window_attn, window_tree, near, window_mask(mask, window))
    return attn_mask, flat_tree, window_attn, window_tree


def _place(shape: _Shape, s: int, attn: torch.Tensor, tree: torch.Tensor | None, prefix: torch.Tensor | bool,
           mask: torch.Tensor) -> None:
    """Sequence s's rows of the padded attention mask (keys before its mask start get `prefix`) and of the flat
    tree mask."""
    c, n, start = shape.context_lens[s], shape.query_lens[s], shape.starts[s]
    attn[s, 0, :n, :start] = prefix
    attn[s, 0, :n, start : c + n] = mask
    attn[s, 0, n:, 0] = True  # padded query rows attend somewhere so softmax stays finite
    if tree is not None:
        own = mask if shape.masks_context else mask[:, mask.shape[1] - n :]  # without context: the new keys only
        tree[shape.cu[s] : shape.cu[s] + n, : c + n - start] = own


def _query_layout(shape: _Shape) -> tuple[torch.Tensor, torch.Tensor]:
    """query_index [num_seqs, max_q] (row in input_ids, pads -> 0) and query_valid [num_seqs, max_q] bool."""
    query = torch.arange(shape.max_q)[None, :]
    valid = query < torch.tensor(shape.query_lens)[:, None]
    index = torch.where(valid, torch.tensor(shape.cu[:-1])[:, None] + query, 0)
    return index, valid


def _default_positions(shape: _Shape) -> torch.Tensor:
    """[num_tokens] int64: new token i of sequence s at context_len + i."""
    if shape.max_q == 1 and shape.cu[-1] == shape.num_seqs:  # decode: one new token per sequence
        return torch.tensor(shape.context_lens, dtype=torch.int64)
    return torch.tensor([p for c, n in zip(shape.context_lens, shape.query_lens) for p in range(c, c + n)],
                        dtype=torch.int64)


def _block_tables(block_tables: list[list[int]]) -> torch.Tensor:
    """[num_seqs, max_blocks] int32, padded with block 0."""
    max_blocks = max(max((len(b) for b in block_tables), default=1), 1)
    return torch.tensor([b + [0] * (max_blocks - len(b)) for b in block_tables], dtype=torch.int32)
