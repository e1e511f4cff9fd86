"""A relay across processes: agent A decodes on one verifier replica (a child process) and publishes its span's
K/V to the shared store; agent B, on another replica (this process), finds the quote in its prompt, loads the K/V,
and prefills with it. Once through the relay functions over Redis and shared memory (the K/V that crossed must be
A's), once through two VerifierService replicas on a Redis bus (what `specrelay verifier` runs)."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import textwrap
import uuid

import pytest
import torch

from specrelay.services.kvstore import make_store
from specrelay.services.verifier.relay import RelayConfig, relay_prefill
from specrelay.services.verifier.relay_index import lookup_relay
from specrelay.services.verifier.service import VerifierConfig, VerifierService
from specrelay.shared.bus import BusConfig, make_bus
from specrelay.shared.messages import GENERATE_STREAM, Generate, SamplingSpec, TokenChunk
from specrelay.shared.modeling.kv_cache import BlockTable
from specrelay.shared.modeling.loader import load_model
from specrelay.shared.modeling.runner import ModelRunner

from ...conftest import save_tiny_llama
from .relay_helpers import LLAMA3_SCALING, upstream_decode

AGENT_A = textwrap.dedent("""
    import asyncio, json, sys, torch
    sys.path.insert(0, {helpers_dir!r})
    from relay_helpers import upstream_decode
    from specrelay.services.kvstore import make_store
    from specrelay.services.verifier.relay_index import publish_span
    from specrelay.shared.modeling.loader import load_model
    from specrelay.shared.modeling.runner import ModelRunner

    torch.set_num_threads(1)
    runner = ModelRunner(load_model({model_dir!r}), num_blocks=64)
    out, span = upstream_decode(runner, list(range(60, 85)), 97, seed=21, max_token=80)

    async def main():
        store = {open_store}
        chunks = await publish_span(store, "tiny@test", span)
        await store.close()
        print(json.dumps({{"output": out, "chunks": chunks}}))

    asyncio.run(main())
""")

REPLICA_A = textwrap.dedent("""
    import asyncio, torch
    from specrelay.services.verifier.relay import RelayConfig
    from specrelay.services.verifier.service import VerifierConfig, VerifierService
    from specrelay.shared.bus import BusConfig, make_bus

    torch.set_num_threads(1)

    async def main():
        async with make_bus({url!r}, BusConfig(prefix={prefix!r}, block_ms=20)) as bus:
            await VerifierService(VerifierConfig(**{config!r}, relay=RelayConfig(enabled=True),
                                                 consumer="replica-a"), bus).run()

    asyncio.run(main())
""")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_llama(tmp_path_factory.mktemp("relay-xproc"), seed=13, num_hidden_layers=3,
                           rope_scaling=LLAMA3_SCALING)


@pytest.mark.parametrize("backend", ["redis", "shm"])
async def test_agent_b_reuses_what_agent_a_decoded_in_another_process(backend, model_dir, request):
    if backend == "redis":
        url, prefix = request.getfixturevalue("redis_url"), request.getfixturevalue("redis_prefix")
        store = make_store(url, 1 << 24, prefix=prefix)
        open_store = f"make_store({url!r}, 1 << 24, prefix={prefix!r})"
    else:
        name = f"srtest-{uuid.uuid4().hex[:12]}"
        store = make_store(f"shm://{name}", 1 << 24)
        open_store = f"make_store('shm://{name}', attach=True)"
    try:
        script = AGENT_A.format(helpers_dir=str(__import__("pathlib").Path(__file__).parent),
                                model_dir=str(model_dir), open_store=open_store)
        proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        agent_a = json.loads(proc.stdout.strip().splitlines()[-1])
        assert agent_a["chunks"] > 0

        runner = ModelRunner(load_model(model_dir), num_blocks=64, prefill_chunk=4096)
        quote = agent_a["output"][5:90]
        prompt = [95, 96, 97, 98] * 6 + quote + [99, 100, 99, 100]  # the quote at row 24, not a prefix
        placed = await lookup_relay(store, "tiny@test", prompt, runner.model.inv_freq)
        assert [(p.start, len(p.kv)) for p in placed] == [(24, 85)]

        # What came through the store is A's decode-phase K/V: B recomputes A's decode here and compares.
        out, span = upstream_decode(runner, list(range(60, 85)), 97, seed=21, max_token=80)
        assert out == agent_a["output"]
        local = span.slice(5, 90, runner.model.inv_freq)
        assert (placed[0].kv.k - local.k).abs().max() <= 1e-5 and (placed[0].kv.v - local.v).abs().max() <= 1e-5

        full_table, relay_table, exact_table = BlockTable(), BlockTable(), BlockTable()
        full = runner.prefill(full_table, prompt)
        relayed = relay_prefill(runner.model, runner.cache, relay_table, prompt, placed, RelayConfig())
        exact = relay_prefill(runner.model, runner.cache, exact_table, prompt, placed,
                              RelayConfig(method="cacheblend", recompute_ratio=1.0))
        assert relayed.num_span_tokens == 85 and 0.5 < relayed.reuse_rate < 1.0
        assert torch.equal(exact.logits[-1], full)
        assert not torch.equal(relayed.logits[-1], full)  # the relayed K/V was really used
    finally:
        if backend == "redis":
            await store.clear()
        await store.close()


async def _ask(bus, channel, request_id: str, prompt: list[int], sampling: SamplingSpec, timeout_s: float):
    await bus.publish(GENERATE_STREAM, Generate(request_id, prompt, sampling, channel.name))
    tokens: list[int] = []
    while True:
        chunk: TokenChunk = await asyncio.wait_for(channel.get(), timeout_s)
        assert chunk.request_id == request_id and chunk.error is None, chunk
        tokens[chunk.offset :] = chunk.token_ids
        if chunk.finish_reason is not None:
            return tokens, chunk.usage


async def test_two_verifier_replicas_relay_over_redis(model_dir, redis_url, redis_prefix):
    """Replica A (a child process) serves agent A and exits; replica B (here) serves agent B, whose prompt quotes
    A's answer, and reports the reuse in usage. Bus and KV store are the same Redis, as in compose.yaml."""
    config = dict(model_dir=str(model_dir), redis=redis_url, speculate=False, num_blocks=128, report_kv=False,
                  kvstore=redis_url, kvstore_capacity_bytes=1 << 24, kvstore_prefix=redis_prefix)
    script = REPLICA_A.format(url=redis_url, prefix=redis_prefix, config=config)
    replica_a = subprocess.Popen([sys.executable, "-c", script], stderr=subprocess.PIPE, text=True)
    store = make_store(redis_url, 1 << 24, prefix=redis_prefix)
    try:
        async with make_bus(redis_url, BusConfig(prefix=redis_prefix, block_ms=20)) as bus:
            channel = bus.open_reply_channel(TokenChunk)
            prompt_a = list(range(60, 85))
            try:
                out_a, _ = await _ask(bus, channel, "agent-a", prompt_a,
                                      SamplingSpec(temperature=1.0, seed=5, max_tokens=80), timeout_s=120)
            finally:
                replica_a.terminate()
                _, stderr = replica_a.communicate(timeout=30)
            assert len(out_a) == 80, stderr

            replica_b = VerifierService(VerifierConfig(**config, relay=RelayConfig(enabled=True), consumer="replica-b"),
                                        bus)
            task = asyncio.create_task(replica_b.run())
            try:
                prompt_b = [95, 96, 97, 98] * 6 + out_a + [99, 100, 99, 100]  # A's answer at row 24
                out_b, usage = await _ask(bus, channel, "agent-b", prompt_b, SamplingSpec(max_tokens=8),
                                          timeout_s=60)
            finally:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        assert len(out_b) == 8
        assert usage.relay is not None and usage.relay.span_tokens == 79  # A's last token had no K/V yet
        assert usage.relay.reused_tokens > 0 and usage.cached_tokens == 0
    finally:
        if replica_a.poll() is None:
            replica_a.kill()
            replica_a.wait()
        await store.clear()
        await store.close()
