"""A relay across processes: agent A decodes on one verifier replica (a child process) and publishes its span's
K/V to the shared store; agent B, on another replica (this process), finds the quote in its prompt, loads the K/V,
and prefills with it."""

from __future__ import annotations

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
