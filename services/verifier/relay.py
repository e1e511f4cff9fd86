"""Relay-aware prefill: a downstream agent's prompt quotes what an upstream agent generated, and the K/V the upstream
agent computed while *decoding* that text is reused instead of recomputed (RelayCaching, arXiv 2603.13289).

A relayed span is stored at relative positions (keys rotated as if the span began at position 0, `capture_span`)
and re-rotated in place to where it lands in the new prompt (kernels/rope_shift: R(p + δ) = R(δ)·R(p), exact up to
rounding, llama3 scaling included because it only changes inv_freq).

The prefill runs layer by layer over the model's own modules. Rows of the prompt are *active* (their hidden state
is carried through the layer and their fresh K/V written) or *reused* (their slots keep the relayed K/V):

    layers  0 .. c-1      every row active (fresh K/V); the relayed K/V is only compared at the check layers
    layer   c             (the last check layer) fresh K/V for every row; then the selection rule picks the span
                          rows to keep recomputing; the others stop here
    layers  c+1 .. L-1    active = rows outside spans ∪ selected span rows ∪ rows that want logits

so the savings are the hidden states of unselected span rows past the check layer (CacheBlend, arXiv 2405.16444,
§4: recompute everything at an early check layer, then only the high-deviation tokens). `naive` reuses every span
row in every layer; when the rule selects every span row no relayed value survives and the result is exactly a full
prefill. `recompute_first` keeps each span's first tokens active in every layer whatever the rule says (EPIC,
arXiv 2410.15332; naive + recompute_first is EPIC itself). Which check layers, and whether the span head is
recomputed, is measured per model (relay_profile.py: where the relayed K/V deviate, layer by layer).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch

from specrelay.kernels.rope_shift import rope_shift_
from specrelay.services.verifier import relay_select
from specrelay.shared.errors import ConfigError
from specrelay.shared.modeling.batch import ForwardBatch
from specrelay.shared.modeling.kv_cache import BlockTable, PagedKVCache
from specrelay.shared.modeling.llama import LlamaForCausalLM, write_kv
from specrelay.shared.modeling.rope import rope_cos_sin, rope_shift

RelayMethod = Literal["relaycaching", "cacheblend", "naive"]
RELAY_METHODS: tuple[str, ...] = ("relaycaching", "cacheblend", "naive")


@dataclass(frozen=True)
class RelayConfig:
    # Whether a verifier publishes outputs and relay-prefills prompts that quote them. Off by default: on the real
    # model no reuse method yet keeps the answer (README, RelayCaching); `relay_prefill` itself always reuses the
    # spans it is given, with the settings below.
    enabled: bool = False
    method: RelayMethod = "relaycaching"
    recompute_ratio: float = 0.15  # cacheblend, and relaycaching with select="top": the share recomputed
    # relaycaching: recompute when deviation ≥ factor · mean, or attention received ≥ factor · mean. The paper's
    # 1.5 / 1.45 (from span tails) select ~27% of a 256-token span on the embedded pair; 2.0 / 2.5 from the
    # prompt's tail keep reuse ≥ 0.8 at every span length at about the same KL (README, RelayCaching).
    deviation_factor: float = 2.0
    influence_factor: float = 2.5
    influence_window: int = 10  # relaycaching: how many tokens' attention measures influence
    influence_from: Literal["span", "prompt"] = "prompt"  # ... the last tokens of the whole prompt, or of each span
    # "check": attention at the check layers only. "all": the prompt's tail attention summed over every layer (the
    # paper's Σ over layers), from a probe pass of the rows outside spans over the relayed K/V: about half the KL
    # at 1k-token spans, but the probe costs 10-30% of TTFT on this CPU (README, RelayCaching)
    influence_layers: Literal["all", "check"] = "check"
    # relaycaching: "threshold" recomputes influence ≥ β·mean; "top" the recompute_ratio share of span tokens with
    # the largest influence (over all spans of the prompt, so a fixed budget), either way ∪ deviation ≥ α·mean.
    # With influence_layers="all" the ranking is close to the best one by true deep-layer error (README)
    select: Literal["threshold", "top"] = "threshold"
    # layers where every span row is run afresh and compared; the last one ends the recompute-all band. None: the
    # band measured for the model (relay_profile.py), which the caller resolves before prefilling
    check_layers: tuple[int, ...] | None = (1,)
    # EPIC (arXiv 2410.15332): the first tokens of each span lost the context they were decoded in, so they are
    # recomputed in every layer whatever the rule says; method="naive" with recompute_first=16 is EPIC itself
    recompute_first: int = 0
    min_span_tokens: int = 16  # shorter matches are prefilled as usual

    def __post_init__(self):
        if self.method not in RELAY_METHODS:
            raise ConfigError(f"relay method must be one of {', '.join(RELAY_METHODS)}, got {self.method!r}")
        if not 0.0 <= self.recompute_ratio <= 1.0:
            raise ConfigError(f"relay recompute ratio must be within [0, 1], got {self.recompute_ratio}")
        if self.deviation_factor < 0 or self.influence_factor < 0:
            raise ConfigError("relay deviation and influence factors must be non-negative")
        if self.influence_from not in ("span", "prompt"):
            raise ConfigError(f"relay influence_from must be 'span' or 'prompt', got {self.influence_from!r}")
        if self.influence_layers not in ("all", "check"):
            raise ConfigError(f"relay influence_layers must be 'all' or 'check', got {self.influence_layers!r}")
        if self.select not in ("threshold", "top"):
            raise ConfigError(f"relay select must be 'threshold' or 'top', got {self.select!r}")
        if self.influence_window < 1 or self.min_span_tokens < 1:
            raise ConfigError("relay influence window and minimum span length must be positive")
        if self.recompute_first < 0:
            raise ConfigError(f"relay recompute_first must be non-negative, got {self.recompute_first}")
        if self.method != "naive" and self.check_layers is not None and (
                not self.check_layers or min(self.check_layers) < 0):
            raise ConfigError(f"relay check layers must be non-negative layer indices, got {self.check_layers}")


@dataclass(frozen=True)
class SpanKV:
    """A relayed span's K/V as produced upstream, keys rotated to relative positions 0 .. n-1."""

    token_ids: tuple[int, ...]
    k: torch.Tensor  # [num_layers, n, num_kv_heads, head_dim]
    v: torch.Tensor  # [num_layers, n, num_kv_heads, head_dim]

    def __post_init__(self):
        assert self.k.shape == self.v.shape and self.k.shape[1] == len(self.token_ids), (
            f"span of {len(self.token_ids)} tokens with K {tuple(self.k.shape)}, V {tuple(self.v.shape)}")

    def __len__(self) -> int:
        return len(self.token_ids)

    def slice(self, begin: int, end: int, inv_freq: torch.Tensor) -> SpanKV:
        """A sub-span, re-based so that its first key again sits at relative position 0."""
        k = self.k[:, begin:end]
        return SpanKV(self.token_ids[begin:end], _shift_keys(k, -begin, inv_freq) if begin else k,
                      self.v[:, begin:end])


@dataclass(frozen=True)
class PlacedSpan:
    start: int  # row of the prompt (0 = its first new token) where the span's first token lands
    kv: SpanKV


@dataclass
class RelayPrefill:
    logits: torch.Tensor  # [num_logits_rows, vocab] float32
    num_prompt_tokens: int
    num_span_tokens: int  # prompt tokens covered by relayed spans
    num_recomputed_tokens: int  # span tokens selected for recompute past the check layer
    num_reused_kv: int  # (layer, token) K/V entries served from the relay
    selected_rows: list[int] = field(default_factory=list)  # the recomputed span rows, for inspection

    @property
    def num_reused_tokens(self) -> int:
        return self.num_span_tokens - self.num_recomputed_tokens

    @property
    def reuse_rate(self) -> float:
        """Share of the relayed tokens whose K/V is kept rather than recomputed (the papers' reuse rate)."""
        return self.num_reused_tokens / self.num_span_tokens if self.num_span_tokens else 0.0


def capture_span(cache: PagedKVCache, table: BlockTable, begin: int, end: int, token_ids: list[int],
                 inv_freq: torch.Tensor) -> SpanKV:
    """The decode-phase K/V of tokens [begin, end) of a sequence (logical index = RoPE position), keys rotated
    back to relative positions so that any later prompt can place the span anywhere."""
    assert 0 <= begin <= end <= table.num_tokens and len(token_ids) == end - begin
    bs = cache.block_size
    slots = torch.tensor([table.blocks[p // bs] * bs + p % bs for p in range(begin, end)], device=cache.k.device)
    k = _flat(cache.k)[:, slots].clone()  # [num_layers, n, H_kv, D]
    v = _flat(cache.v)[:, slots].clone()
    return SpanKV(tuple(token_ids), _shift_keys(k, -begin, inv_freq), v)


def relay_prefill(model: LlamaForCausalLM, cache: PagedKVCache, table: BlockTable, token_ids: list[int],
                  spans: list[PlacedSpan], config: RelayConfig = RelayConfig(),
                  logits_rows: list[int] | None = None) -> RelayPrefill:
    """Prefill `token_ids` after the `table.num_tokens` cached ones, reusing the relayed `spans`. Returns logits
    for `logits_rows` (default: the last token) and what was reused."""
    n = len(token_ids)
    if n == 0:
        raise ValueError("empty prompt")
    rows_wanted = logits_rows if logits_rows is not None else [n - 1]
    if config.check_layers is None and config.method != "naive":
        raise ValueError("relay check layers unresolved: pass the model's band (relay_profile.band_for)")
    spans = sorted(spans, key=lambda s: s.start)
    _check_spans(spans, token_ids)
    with torch.inference_mode():
        return _RelayForward(model, cache, table, token_ids, spans, config, rows_wanted).run()


class _RelayForward:
    def __init__(self, model, cache, table, token_ids, spans, config, rows_wanted):
        self.model, self.cache, self.table, self.config = model, cache, table, config
        self.spans, self.rows_wanted = spans, rows_wanted
        self.device = model.device
        self.n = len(token_ids)
        self.context_len = table.num_tokens
        self.slots = torch.tensor(cache.reserve(table, self.n), device=self.device)  # [n]
        self.positions = torch.arange(self.context_len, self.context_len + self.n, device=self.device)
        self.input_ids = torch.tensor(token_ids, device=self.device)
        self.span_rows = torch.zeros(self.n, dtype=torch.bool, device=self.device)  # [n]
        for s in spans:
            self.span_rows[s.start : s.start + len(s.kv)] = True
        self.num_span_tokens = int(self.span_rows.sum())
        self.num_layers = model.config.num_layers
        # a check layer past the model's depth means its last layer: the rule still runs, never silently naive
        check = () if config.method == "naive" else tuple(min(c, self.num_layers - 1) for c in config.check_layers)
        self.check_layers = set(check)
        self.last_check = max(check, default=-1)
        self.deviation = torch.zeros(self.num_span_tokens, device=self.device)  # summed over check layers
        self.influence = torch.zeros(self.num_span_tokens, device=self.device)
        self.probe = (config.method == "relaycaching" and config.influence_from == "prompt"
                      and config.influence_layers == "all" and self.num_span_tokens > 0)
        self.num_reused_kv = 0

    def run(self) -> RelayPrefill:
        self._load_spans()
        if self.probe:
            self._probe_influence()
        must = torch.zeros(self.n, dtype=torch.bool, device=self.device)
        must[self.rows_wanted] = True
        for s in self.spans:  # EPIC's span heads
            must[s.start : s.start + min(self.config.recompute_first, len(s.kv))] = True
        if self.probe:  # the probe computed the tail rows over relayed K/V: recompute any that sit in a span
            must[max(0, self.n - self.config.influence_window):] = True
        self.must = must
        self.keep = ~self.span_rows | must  # rows active past the check layers whatever the rule says
        active = torch.ones(self.n, dtype=torch.bool, device=self.device) if self.last_check >= 0 else self.keep
        self.selected = must[self.span_rows]  # a span row that wants logits is always recomputed
        self.rows = active.nonzero().squeeze(1)  # the prompt rows the layers run
        self.batch = self._batch(self.rows)
        x = self.model.model.embed_tokens(self.input_ids[self.rows])
        cos, sin = rope_cos_sin(self.model.inv_freq, self.positions, x.dtype)  # [n, head_dim]
        for layer in self.model.model.layers:
            if not self.rows.numel():  # every row stopped: a prompt that ends in a reused span, no logits wanted
                self.num_reused_kv += self.num_span_tokens
                continue
            all_rows = self.rows.numel() == self.n
            row_cos, row_sin = (cos, sin) if all_rows else (cos[self.rows], sin[self.rows])
            x = layer(x, row_cos, row_sin, self.batch, self.cache, rows=self._layer_rows)
        # rows_wanted are active throughout, so they sit in x in row order among the active rows
        wanted = torch.tensor(self.rows_wanted, dtype=torch.int64, device=self.device)  # may be empty
        pick = torch.searchsorted(self.rows, wanted)
        logits = self.model.lm_head(self.model.model.norm(x[pick])).float()
        self.table.num_tokens += self.n
        span_rows = self.span_rows.nonzero().squeeze(1)
        return RelayPrefill(logits=logits, num_prompt_tokens=self.n, num_span_tokens=self.num_span_tokens,
                            num_recomputed_tokens=int(self.selected.sum()), num_reused_kv=self.num_reused_kv,
                            selected_rows=span_rows[self.selected].tolist())

    def _layer_rows(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        """The model's row hook (shared/modeling/llama.py: RowHook): the active rows' fresh K/V measured against
        the relayed K/V at a check layer, then written; at the last check layer the rule stops the span rows it
        does not select. Returns the rows of x that go on and their batch."""
        rows = self.rows
        if layer in self.check_layers:
            self._measure(v, self.cache.v[layer])
        write_kv(k, v, self.cache, layer, self.slots[rows])
        self.num_reused_kv += self.num_span_tokens - int(self.span_rows[rows].sum())
        if layer in self.check_layers and not self.probe:
            self._measure_influence(layer, q)
        if layer != self.last_check:
            return None, self.batch
        self.selected = self._select() | self.must[self.span_rows]
        after = self.keep.clone()
        after[self.span_rows] |= self.selected
        keep_in_active = after[rows]  # which of this layer's rows go on
        if keep_in_active.all():
            return None, self.batch
        self.rows = rows[keep_in_active]
        self.batch = self._batch(self.rows)
        return keep_in_active, self.batch

    def _probe_influence(self) -> None:
        """The rows outside spans, and the prompt's last `influence_window` rows, run through every layer over the
        relayed K/V (a naive-reuse pass); the attention the last rows pay each span token is summed over layers and
        heads into `influence`. The prefill after this overwrites every K/V the probe wrote: rows outside spans and
        the tail rows are recomputed in every layer.

        Why sum over layers: deep layers attend to other span tokens than the check layer does. On the embedded
        pair it halves the KL at 1k-token spans (README), but the probe adds 10-30% to TTFT on a CPU."""
        window = self.config.influence_window
        probe = ~self.span_rows
        probe[max(0, self.n - window):] = True
        rows = probe.nonzero().squeeze(1)
        tail = torch.arange(rows.numel() - min(window, self.n), rows.numel(), device=self.device)
        span_keys = self.context_len + self.span_rows.nonzero().squeeze(1)
        batch = self._batch(rows)

        def probe_rows(layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
            write_kv(k, v, self.cache, layer, self.slots[rows])
            attn = self.model.model.layers[layer].self_attn
            score = relay_select.influence(q[tail], self._keys(layer), self.positions[rows[tail]],
                                           self._key_positions(), attn.scale, attn.window)
            self.influence += score[span_keys]
            return None, batch

        x = self.model.model.embed_tokens(self.input_ids[rows])
        cos, sin = rope_cos_sin(self.model.inv_freq, self.positions[rows], x.dtype)
        for layer in self.model.model.layers:
            x = layer(x, cos, sin, batch, self.cache, rows=probe_rows)

    def _load_spans(self) -> None:
        """Relayed K/V into the span rows' slots (every layer), keys re-rotated from relative to new positions."""
        if not self.spans:
            return
        flat_k, flat_v = _flat(self.cache.k), _flat(self.cache.v)  # [num_layers, num_slots, H_kv, D]
        deltas = []
        for s in self.spans:
            slots = self.slots[s.start : s.start + len(s.kv)]
            flat_k[:, slots] = s.kv.k.to(device=self.device, dtype=flat_k.dtype)
            flat_v[:, slots] = s.kv.v.to(device=self.device, dtype=flat_v.dtype)
            deltas.append(torch.full((len(s.kv),), self.context_len + s.start, dtype=torch.int64))
        span_slots = self.slots[self.span_rows]
        rope_shift_(self.cache.k, span_slots, torch.cat(deltas).to(self.device), self.model.inv_freq)

    def _measure(self, v_fresh: torch.Tensor, v_cache: torch.Tensor) -> None:
        """Deviation of the fresh values from the relayed ones still in the slots (before they are overwritten).
        At a check layer every row is active, so v_fresh rows are prompt rows."""
        if not self.num_span_tokens:
            return
        v_relayed = v_cache.view(-1, *v_cache.shape[2:])[self.slots[self.span_rows]]
        v_span = v_fresh[self.span_rows]
        if self.config.method == "cacheblend":
            self.deviation += relay_select.l2_deviation(v_span, v_relayed)
        else:
            self.deviation += relay_select.cosine_deviation(v_span, v_relayed)

    def _measure_influence(self, layer: int, q: torch.Tensor) -> None:
        """Attention each span token receives from the last `influence_window` tokens of its span (or of the
        prompt: influence_from), at this layer (a check layer: q holds every prompt row)."""
        if self.config.method != "relaycaching" or not self.num_span_tokens:
            return
        attn = self.model.model.layers[layer].self_attn
        keys, key_positions = self._keys(layer), self._key_positions()
        offset, window = 0, self.config.influence_window

        def score_of(w_rows: torch.Tensor) -> torch.Tensor:
            return relay_select.influence(q[w_rows], keys, self.positions[w_rows], key_positions, attn.scale,
                                          attn.window)

        if self.config.influence_from == "prompt":  # the tokens the answer is generated from
            prompt_score = score_of(torch.arange(max(0, self.n - window), self.n, device=self.device))
        for s in self.spans:
            m = len(s.kv)
            score = prompt_score if self.config.influence_from == "prompt" else score_of(
                torch.arange(s.start + max(0, m - window), s.start + m, device=self.device))
            begin = self.context_len + s.start
            self.influence[offset : offset + m] += score[begin : begin + m]
            offset += m

    def _select(self) -> torch.Tensor:
        """[num_span_tokens] bool: span rows recomputed past the last check layer."""
        cfg = self.config
        if cfg.method == "cacheblend":
            return relay_select.top_ratio(self.deviation, cfg.recompute_ratio)
        if cfg.select == "top":  # influence ranked over every span: one budget, spent where the answer reads
            return relay_select.top_influence_select(self.deviation, self.influence, self._span_ids(),
                                                     cfg.recompute_ratio, cfg.deviation_factor)
        chosen, offset = [], 0
        for s in self.spans:  # each span against its own mean: prefix effects differ from span to span
            m = len(s.kv)
            chosen.append(relay_select.relaycaching_select(
                self.deviation[offset : offset + m], self.influence[offset : offset + m],
                cfg.deviation_factor, cfg.influence_factor))
            offset += m
        return torch.cat(chosen) if chosen else self.deviation.bool()

    def _span_ids(self) -> torch.Tensor:
        """[num_span_tokens] int64: which span (in prompt order) each span token belongs to."""
        lengths = torch.tensor([len(s.kv) for s in self.spans], device=self.device)
        return torch.repeat_interleave(torch.arange(len(self.spans), device=self.device), lengths)

    def _keys(self, layer: int) -> torch.Tensor:
        """[context_len + n, H_kv, D]: one layer's keys of this sequence in position order, as the cache holds them."""
        blocks = torch.tensor(self.table.blocks, dtype=torch.int64, device=self.device)
        return self.cache.k[layer][blocks].flatten(0, 1)[: self.context_len + self.n]

    def _key_positions(self) -> torch.Tensor:
        return torch.arange(self.context_len + self.n, device=self.device)

    def _batch(self, rows: torch.Tensor) -> ForwardBatch:
        """The batch the model's layers attend with: one sequence whose queries are `rows` of the prompt. The K/V of
        the other prompt rows sit in the cache (relayed, or written at an earlier layer), so they count as cached
        context, and a mask over the prompt's keys (mask_starts) lets each query see the keys at or before its
        position, cut to the window in the model's windowed layers as its own forward does: the torch path and
        the Triton kernel read the same batch."""
        positions = self.positions[rows]
        prompt_keys = torch.arange(self.context_len, self.context_len + self.n, device=self.device)
        mask = prompt_keys[None, :] <= positions[:, None]  # [num_rows, n]
        return ForwardBatch.build(
            [self.input_ids[rows].tolist()], [self.context_len + self.n - rows.numel()], [self.slots[rows].tolist()],
            [self.table.blocks], positions=[positions.tolist()], tree_masks=[mask.cpu()],
            mask_starts=[self.context_len], logits_rows=[[]], window=self.model.config.sliding_window or 0,
            device=self.device)


def _flat(cache: torch.Tensor) -> torch.Tensor:
    """[num_layers, num_blocks, block_size, H_kv, D] -> [num_layers, num_slots, H_kv, D] (a view)."""
    return cache.view(cache.shape[0], -1, *cache.shape[3:])


def _shift_keys(k: torch.Tensor, delta: int, inv_freq: torch.Tensor) -> torch.Tensor:
    """Keys [num_layers, n, H_kv, D] re-rotated by `delta` positions (a copy)."""
    num_layers, n = k.shape[:2]
    d = torch.full((num_layers * n,), delta, dtype=torch.int64, device=k.device)
    return rope_shift(k.reshape(num_layers * n, *k.shape[2:]), d, inv_freq).view_as(k)


def _check_spans(spans: list[PlacedSpan], token_ids: list[int]) -> None:
    end = 0
    for s in spans:
        if s.start < end or s.start + len(s.kv) > len(token_ids):
            raise ValueError(f"relayed spans overlap or run past the prompt (span at {s.start}, {len(s.kv)} tokens)")
        if list(s.kv.token_ids) != token_ids[s.start : s.start + len(s.kv)]:
            raise ValueError(f"relayed span at {s.start} does not match the prompt's tokens")
        end = s.start + len(s.kv)
