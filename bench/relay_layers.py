"""Measuring the layer profile that relay_profile.py keeps per model: where relayed K/V deviate from a full prefill's,
layer by layer, over the relay bench's planner -> worker handoffs (relay_pipeline.py). `specrelay bench relay
--layer-profile` runs it and caches the result, which the verifier reads (relay_profile.band_for)."""

from __future__ import annotations

import torch

from specrelay.services.verifier.relay_profile import FIRST_TOKENS, LayerProfile, choose_band, choose_head


def span_deviation(runner, span, start: int, full_table) -> tuple[torch.Tensor, torch.Tensor]:
    """[num_layers, n] value and key deviations of a relayed span placed at row `start` of the sequence in
    `full_table` (a full prefill of it)."""
    from specrelay.shared.modeling.rope import rope_shift

    cache, n = runner.cache, len(span)
    bs = cache.block_size
    slots = torch.tensor([full_table.blocks[p // bs] * bs + p % bs for p in range(start, start + n)])
    flat = lambda c: c.view(c.shape[0], -1, *c.shape[3:])[:, slots].float()  # noqa: E731  [L, n, H_kv, D]
    k_full, v_full = flat(cache.k), flat(cache.v)
    num_layers = span.k.shape[0]
    delta = torch.full((num_layers * n,), start, dtype=torch.int64)
    k_rel = rope_shift(span.k.reshape(num_layers * n, *span.k.shape[2:]), delta, runner.model.inv_freq)
    k_rel = k_rel.view_as(span.k).float()

    def dev(a, b):
        return 1.0 - torch.nn.functional.cosine_similarity(a.flatten(2), b.flatten(2), dim=-1, eps=1e-8)

    return dev(span.v.float(), v_full).clamp_min(0.0), dev(k_rel, k_full).clamp_min(0.0)


def measure(runner, texts, span_lens: list[int], num_prompts: int, seed: int, banned: list[int], name: str,
            first_tokens: int = FIRST_TOKENS) -> LayerProfile:
    """The deviation profile over `num_prompts` planner -> worker handoffs per span length (relay_pipeline's
    agents: real sampled decodes, their decode-phase K/V)."""
    from specrelay.services.verifier.relay import capture_span
    from specrelay.bench.relay_pipeline import PLANNER, TASKS, WORKER, decode_agent
    from specrelay.shared.modeling.kv_cache import BlockTable

    sums = {key: torch.zeros(runner.model.config.num_layers, dtype=torch.float64) for key in ("v", "k", "vf", "vr")}
    counts = {"all": 0, "first": 0, "rest": 0}
    with torch.inference_mode():
        for span_len in span_lens:
            for p in range(num_prompts):
                gen = torch.Generator().manual_seed(seed * 1000 + p)
                lead, topic = TASKS[p % len(TASKS)]
                planner = texts.chat(PLANNER, [], lead=lead, topic=topic)
                plan, table = decode_agent(runner, planner, span_len, gen, banned)
                span = capture_span(runner.cache, table, len(planner), len(planner) + len(plan), plan,
                                    runner.model.inv_freq)
                runner.release(table)
                worker = texts.chat(WORKER, [plan])
                start = next(i for i in range(len(worker)) if worker[i : i + len(plan)] == plan)
                full = BlockTable()
                runner.prefill(full, worker)
                dv, dk = span_deviation(runner, span, start, full)
                runner.release(full)
                head = min(first_tokens, len(plan))
                sums["v"] += dv.sum(1).double()
                sums["k"] += dk.sum(1).double()
                sums["vf"] += dv[:, :head].sum(1).double()
                sums["vr"] += dv[:, head:].sum(1).double()
                counts["all"] += len(plan)
                counts["first"] += head
                counts["rest"] += len(plan) - head
    mean = lambda key, n: [round(float(x) / max(1, n), 6) for x in sums[key]]  # noqa: E731
    profile = LayerProfile(name, runner.model.config.num_layers, list(span_lens), num_prompts, first_tokens,
                           mean("v", counts["all"]), mean("k", counts["all"]), mean("vf", counts["first"]),
                           mean("vr", counts["rest"]))
    profile.check_layers = choose_band(profile.dev_v)
    profile.recompute_first = choose_head(profile)
    return profile
